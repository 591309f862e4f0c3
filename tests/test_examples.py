"""The examples train, checkpoint, resume bitwise, and reject bad flags and bad files cleanly.

Each example runs in a short mode (a few epochs); the oracles are closed forms (a chance-level
loss, a fixed accuracy bar), an uninterrupted run of the same command, optax on one device, and
for every failure the contract of the command line: exit status 2, exactly one line on stderr
that names the problem, no traceback, no hang (every subprocess has a timeout).

The examples need the `examples` extra (flax, orbax-checkpoint, scikit-learn, matplotlib, tqdm);
a missing one fails here rather than skipping.
"""

import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import matplotlib  # noqa: F401  (the examples' --plot)
import numpy as np
import optax
import orbax.checkpoint  # noqa: F401  (the examples' --checkpoint-dir)
import pytest
import sklearn  # noqa: F401  (the digits task)
import tqdm  # noqa: F401  (the examples' progress bar)

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import data_parallel  # noqa: E402
import flax_mlp  # noqa: E402
import flax_nnx_mlp  # noqa: E402
import quickstart  # noqa: E402

from tests.helpers import free_port, run_processes  # noqa: E402

TIMEOUT_S = 240


def leaves_equal_bitwise(a, b):
    """True when two pytrees of arrays have the same structure and identical bytes per leaf."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x.dtype == y.dtype and x.shape == y.shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


def run_example(script, *flags, env=None):
    """Runs an example in a fresh process, bounded in time; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, flags)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def assert_one_line_error(status, err, prog, *fragments):
    """Exit status 2 and exactly one stderr line `prog: error: ...` holding every fragment."""
    assert status == 2, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def main_fails(main, argv, capfd, prog, *fragments):
    """Calls an example's main(argv) in this process, checks its one-line failure; (stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capfd.readouterr()
    assert_one_line_error(exit_info.value.code, err, prog, *fragments)
    return out, err


# Training runs.


def test_linen_digits_short_run_loss_falls_and_passes_90_percent():
    run = flax_mlp.main(["--epochs", "5", "--quiet"])
    loss = run["history"]["loss"]
    assert loss[-1] < 0.5 * loss[0]
    # 10 classes: chance is 10%; five epochs of Adam at 1e-3 put a small MLP well above 90%.
    assert run["test_accuracy"] >= 0.90
    assert run["compile_s"] > 0 and len(run["epoch_times"]) == 5


def test_linen_seed_task_starts_at_chance_and_loss_falls():
    run = flax_mlp.main(["--task", "seed", "--epochs", "4", "--quiet"])
    loss = run["history"]["loss"]
    # Random binary labels: a fresh sigmoid output sits near the chance loss ln 2.
    assert abs(loss[0] - math.log(2)) < 0.05
    assert loss[-1] < loss[0]
    assert run["num_batches"] == math.ceil(1000 / 32)


def test_nnx_digits_short_run_loss_falls_and_passes_90_percent():
    run = flax_nnx_mlp.main(["--epochs", "5", "--quiet"])
    loss = run["history"]["loss"]
    assert loss[-1] < 0.5 * loss[0]
    assert run["test_accuracy"] >= 0.90


def test_compare_writes_one_figure_with_a_run_per_optimizer(tmp_path):
    path = tmp_path / "compare.png"
    result = flax_mlp.main(["--compare", "adam,sgd", "--task", "seed", "--epochs", "1", "--quiet",
                            "--plot", str(path)])
    assert set(result["runs"]) == {"adam", "sgd"}
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["compare.png"]


def test_run_killed_mid_way_and_resumed_ends_bitwise_equal_to_uninterrupted(tmp_path):
    epochs = "8"
    flags = ["--epochs", epochs, "--quiet"]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "flax_mlp.py"), *flags, "--checkpoint-dir",
         str(killed_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (killed_dir.is_dir() and any(p.name.isdigit() for p in killed_dir.iterdir())):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared within 60 s"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = [int(p.name) for p in killed_dir.iterdir() if p.name.isdigit()]
    assert max(saved) < int(epochs), "the run finished before it was killed"

    resumed = flax_mlp.main([*flags, "--checkpoint-dir", str(killed_dir), "--resume"])
    uninterrupted = flax_mlp.main(flags)
    assert leaves_equal_bitwise(resumed["params"], uninterrupted["params"])
    assert resumed["history"] == uninterrupted["history"]



def test_data_parallel_two_processes_with_zero1_end_equal_to_single_device_optax(tmp_path):
    """The README's two-process command (with --zero1) against optax.adam on one device."""
    steps, learning_rate = 10, 1e-2
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    coordinator = f"127.0.0.1:{free_port()}"
    saved = tmp_path / "params.npz"
    codes, outputs = run_processes(
        [[sys.executable, str(EXAMPLES / "data_parallel.py"), "--num-processes", "2",
          "--process-id", str(rank), "--coordinator", coordinator, "--epochs", "1",
          "--steps", str(steps), "--learning-rate", str(learning_rate), "--zero1",
          "--save", str(saved)] for rank in range(2)], env, TIMEOUT_S, tmp_path)
    for code, output in zip(codes, outputs):
        assert code == 0, output[-4000:]
        assert "devices: 4 in 2 process(es)" in output
    checksums = [re.findall(r"params checksum: (\S+)", output) for output in outputs]
    assert checksums[0] == checksums[1] and len(checksums[0]) == 1

    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        oracle = data_parallel.train(optax.adam(learning_rate), one, data_parallel.load_task("digits"),
                                     epochs=1, batch_size=128, max_steps=steps, log=lambda line: None)
    flat = {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(oracle)[0]}
    with np.load(saved) as params:
        assert sorted(params.files) == sorted(flat)
        for key, value in flat.items():
            # adamx and optax differ by ~1.5e-6 here (float32 rounding order); the params move ~0.1.
            np.testing.assert_allclose(params[key], value, rtol=0, atol=1e-5, err_msg=key)


# Bad flags: each is one line and exit status 2.


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
    (["--compare", "adam,lion"], "unknown optimizer 'lion'"),
    (["--learning-rate", "-0.1"], "--learning-rate: must be in [1.18e-38, 3.4e+38]"),
    (["--resume"], "--resume needs --checkpoint-dir"),
])
def test_bad_flag_exits_2_with_one_line(flags, message, capfd):
    main_fails(flax_mlp.main, flags, capfd, "flax_mlp.py", message)


@pytest.mark.parametrize("value", ["1e39", "1e-50", "inf", "nan"])
@pytest.mark.parametrize("main, prog", [(flax_mlp.main, "flax_mlp.py"),
                                        (flax_nnx_mlp.main, "flax_nnx_mlp.py"),
                                        (data_parallel.main, "data_parallel.py")])
def test_learning_rate_outside_float32_is_rejected_naming_flag_range_and_value(main, prog, value,
                                                                               capfd):
    # 1e39 is finite in float64 but inf in float32; 1e-50 is positive in float64 but 0 in float32.
    main_fails(main, ["--learning-rate", value], capfd, prog, "argument --learning-rate",
               "[1.18e-38, 3.4e+38]", f"got {float(value):g}")


def test_resume_from_missing_dir_prints_one_line_and_no_traceback(tmp_path):
    proc = run_example("flax_mlp.py", "--resume", "--checkpoint-dir", tmp_path / "never-written")
    assert_one_line_error(proc.returncode, proc.stderr, "flax_mlp.py", "does not exist")
    assert proc.stdout == ""


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_checkpoint_dir_that_cannot_be_a_directory_exits_with_one_line(tmp_path, where):
    """A fresh process: an orbax save that failed in the background used to hang its exit."""
    (tmp_path / "a_file").write_text("not a directory")
    path = tmp_path / "a_file" if where == "file" else tmp_path / "a_file" / "run"
    message = "is not a directory" if where == "file" else "Not a directory"
    proc = run_example("flax_mlp.py", "--task", "seed", "--epochs", "1", "--quiet",
                       "--checkpoint-dir", path)
    assert_one_line_error(proc.returncode, proc.stderr, "flax_mlp.py", "--checkpoint-dir",
                          str(path), message)


@pytest.mark.parametrize("target, message", [
    ("existing_dir", "is a directory; expected a file name ending in .png, .pdf or .svg"),
    ("missing_dir/curves.png", "does not exist"),
    ("curves.txt", "expected a file name ending in .png, .pdf or .svg"),
])
def test_plot_path_that_cannot_take_a_figure_is_rejected_before_training(tmp_path, target, message,
                                                                         capfd):
    (tmp_path / "existing_dir").mkdir()
    path = tmp_path / target
    out, _ = main_fails(flax_mlp.main, ["--task", "seed", "--epochs", "1", "--plot", str(path)],
                        capfd, "flax_mlp.py", "argument --plot", message)
    assert out == ""  # rejected at parse time: nothing was trained
    assert sorted(os.listdir(tmp_path)) == ["existing_dir"]  # and nothing written (no DIR.png)


# A training loss that becomes inf or NaN ends the run: never exit 0 with a broken model.


def first_non_finite_epoch(table):
    """The 1-based epoch of the first Keras-style line whose training loss is not finite."""
    losses = re.findall(r" - loss: (\S+) - ", table)
    return next(i for i, loss in enumerate(losses, start=1) if not math.isfinite(float(loss)))


@pytest.mark.parametrize("main, prog, flags", [
    (flax_mlp.main, "flax_mlp.py", ["--task", "seed", "--epochs", "3", "--learning-rate", "1e18"]),
    (flax_nnx_mlp.main, "flax_nnx_mlp.py", ["--epochs", "2", "--learning-rate", "1e20"]),
])
def test_non_finite_loss_stops_with_the_epoch_it_happened_in(main, prog, flags, capfd):
    out, err = main_fails(main, flags, capfd, prog, "training loss became non-finite")
    epoch = first_non_finite_epoch(out)  # the oracle: the epoch table printed on stdout
    assert re.search(rf"non-finite \((inf|nan)\) in epoch {epoch};", err), err


def test_data_parallel_non_finite_loss_stops_with_one_line(capfd):
    out, err = main_fails(data_parallel.main,
                          ["--epochs", "2", "--steps", "3", "--learning-rate", "1e20"], capfd,
                          "data_parallel.py", "training loss became non-finite")
    epoch = int(re.search(r"epoch (\d+): loss (nan|inf) ", out).group(1))
    assert f"in epoch {epoch};" in err, err


# --resume from a checkpoint that is damaged or was written with other flags.

SEED_RUN = ["--task", "seed", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A directory holding the checkpoint of epoch 1 of a `SEED_RUN` (Adam)."""
    directory = tmp_path_factory.mktemp("checkpoint") / "run"
    flax_mlp.main(["--task", "seed", "--epochs", "1", "--quiet", "--checkpoint-dir", str(directory)])
    assert sorted(os.listdir(directory)) == ["1"]
    return directory


def files_of(directory):
    return [pathlib.Path(root) / name for root, _, names in os.walk(directory) for name in names]


def overwrite_with_garbage(epoch_dir):
    rng = np.random.default_rng(0)
    for path in files_of(epoch_dir):
        path.write_bytes(rng.integers(0, 256, max(path.stat().st_size, 16), np.uint8).tobytes())


def truncate_to_half(epoch_dir):
    for path in files_of(epoch_dir):
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)


def empty(epoch_dir):
    shutil.rmtree(epoch_dir)
    epoch_dir.mkdir()


@pytest.mark.parametrize("damage", [overwrite_with_garbage, truncate_to_half, empty])
def test_resume_from_a_damaged_checkpoint_exits_with_one_line(checkpoint, tmp_path, damage, capfd):
    directory = tmp_path / "run"
    shutil.copytree(checkpoint, directory)
    damage(directory / "1")
    main_fails(flax_mlp.main, [*SEED_RUN, "--checkpoint-dir", str(directory), "--resume"], capfd,
               "flax_mlp.py", f"the checkpoint of epoch 1 in {str(directory)!r} is unreadable or corrupt")


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "sgd"], "--optimizer adam, not sgd"),
    (["--optimizer", "amsgrad"], "--optimizer adam, not amsgrad"),
    (["--learning-rate", "0.01"], "--learning-rate 0.001, not 0.01"),
    (["--batch-size", "16"], "--batch-size 32, not 16"),
    (["--seed", "1"], "--seed 0, not 1"),
])
def test_resume_with_other_flags_than_the_checkpoint_exits_with_one_line(checkpoint, tmp_path, flags,
                                                                         message, capfd):
    directory = tmp_path / "run"
    shutil.copytree(checkpoint, directory)
    main_fails(flax_mlp.main, [*SEED_RUN, "--checkpoint-dir", str(directory), "--resume", *flags],
               capfd, "flax_mlp.py", "was written with " + message)
    assert sorted(os.listdir(directory)) == ["1"]  # nothing was trained or saved


def test_resume_with_another_task_exits_with_one_line(checkpoint, tmp_path, capfd):
    directory = tmp_path / "run"
    shutil.copytree(checkpoint, directory)
    main_fails(flax_mlp.main, ["--epochs", "2", "--checkpoint-dir", str(directory), "--resume"],
               capfd, "flax_mlp.py", "was written with --task seed, not digits")


# Fuzzed flags: a seed, a batch size, an optimizer list, a directory, a step count or an address
# that the code cannot use is one line and exit status 2; a value it can use does what Keras does.

SHORT_RUNS = [(flax_mlp.main, "flax_mlp.py", ["--task", "seed", "--epochs", "1", "--quiet"]),
              (flax_nnx_mlp.main, "flax_nnx_mlp.py", ["--epochs", "1", "--quiet"]),
              (data_parallel.main, "data_parallel.py", ["--epochs", "1", "--steps", "1"]),
              (quickstart.main, "quickstart.py", ["--steps", "1"])]


def test_seed_range_is_where_jax_random_key_and_default_rng_give_a_run_of_its_own():
    """The reason for [0, 2**32 - 1], checked against this JAX and NumPy (64-bit mode off)."""
    def key_data(seed):
        return jax.random.key_data(jax.random.key(seed)).tolist()

    assert key_data(2**32) == key_data(0)  # past the range a seed is another seed's run
    assert key_data(2**32 - 1) != key_data(0)
    with pytest.raises(OverflowError):
        jax.random.key(2**70)
    with pytest.raises(ValueError, match="non-negative"):
        np.random.default_rng(-1)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
@pytest.mark.parametrize("main, prog, flags", SHORT_RUNS)
def test_seed_outside_0_to_2_to_the_32_is_rejected_naming_flag_range_and_value(main, prog, flags, seed,
                                                                                 capfd):
    main_fails(main, [*flags, "--seed", str(seed)], capfd, prog, "argument --seed", "[0, 4294967295]",
               f"got {seed}")


def test_largest_seed_is_accepted_and_trains():
    """The top of the range, and `seed + 1` (the data-order key) past it, both work."""
    run = flax_mlp.main(["--task", "seed", "--epochs", "1", "--quiet", "--seed", str(2**32 - 1)])
    assert run["config"]["seed"] == 2**32 - 1 and math.isfinite(run["history"]["loss"][0])


def optax_full_batch_adam_step(data, learning_rate, seed):
    """The params after one optax.adam step on the mean loss over every training row (the oracle)."""
    state = flax_mlp.create_state(data, "adam", learning_rate, seed)

    def loss_fn(params):
        loss, _ = flax_mlp.per_example(state.apply_fn({"params": params}, data.x_train), data.y_train)
        return loss.mean()

    tx = optax.adam(learning_rate)
    grads = jax.grad(loss_fn)(state.params)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    return optax.apply_updates(state.params, updates)


@pytest.mark.parametrize("batch_size", [1000, 1001, 10**12])
def test_linen_batch_of_the_whole_set_or_more_is_one_full_batch_step_per_epoch_as_in_keras(batch_size):
    """The seed task has 1000 training rows; Keras's fit takes a larger batch as all of them."""
    run = flax_mlp.main(["--task", "seed", "--epochs", "1", "--quiet", "--batch-size", str(batch_size)])
    assert run["num_batches"] == 1
    oracle = optax_full_batch_adam_step(flax_mlp.load_task("seed"), 1e-3, seed=0)
    for got, want in zip(jax.tree.leaves(run["params"]), jax.tree.leaves(oracle)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_nnx_batch_larger_than_the_data_trains_as_the_whole_set():
    rows = len(flax_nnx_mlp.load_task("digits").x_train)
    whole = flax_nnx_mlp.main(["--epochs", "2", "--quiet", "--batch-size", str(rows)])
    larger = flax_nnx_mlp.main(["--epochs", "2", "--quiet", "--batch-size", str(10**12)])
    assert larger["history"] == whole["history"]


def test_data_parallel_batch_larger_than_the_data_is_rejected(capfd):
    """It drops the last partial batch, so a batch larger than the data would train nothing."""
    rows = len(data_parallel.load_task("digits").x_train)
    out, _ = main_fails(data_parallel.main, ["--epochs", "1", "--batch-size", str(rows + 1)], capfd,
                        "data_parallel.py",
                        f"--batch-size must be at most the {rows} training rows, got {rows + 1}")
    assert "params checksum" not in out


@pytest.mark.parametrize("value, message", [
    ("", "expected optimizer names separated by commas, such as adam,sgd, got ''"),
    ("adam,,sgd", "expected optimizer names separated by commas, such as adam,sgd, got 'adam,,sgd'"),
    ("adam,", "expected optimizer names separated by commas, such as adam,sgd, got 'adam,'"),
    ("adam,sgd,adam", "'adam' is listed twice in 'adam,sgd,adam'"),
    ("adam, sgd", "unknown optimizer ' sgd'"),
])
def test_compare_list_that_is_empty_or_malformed_is_rejected(value, message, capfd):
    out, _ = main_fails(flax_mlp.main, ["--task", "seed", "--epochs", "1", "--compare", value], capfd,
                        "flax_mlp.py", "argument --compare: " + message)
    assert out == ""


def test_compare_with_optimizer_is_rejected_rather_than_ignoring_optimizer(capfd):
    main_fails(flax_mlp.main, ["--task", "seed", "--epochs", "1", "--optimizer", "sgd",
                               "--compare", "adam,rmsprop"], capfd, "flax_mlp.py",
               "argument --compare: not allowed with argument --optimizer")


def test_empty_checkpoint_dir_is_rejected_rather_than_saving_nothing(capfd):
    main_fails(flax_mlp.main, ["--task", "seed", "--epochs", "1", "--checkpoint-dir", ""], capfd,
               "flax_mlp.py", "--checkpoint-dir: expected a directory name, got ''")


def test_resume_from_a_checkpoint_past_epochs_is_rejected(tmp_path, capfd):
    directory = tmp_path / "run"
    flax_mlp.main([*SEED_RUN, "--checkpoint-dir", str(directory)])
    main_fails(flax_mlp.main, ["--task", "seed", "--epochs", "1", "--checkpoint-dir", str(directory),
                               "--resume"], capfd, "flax_mlp.py",
               f"the checkpoint in {str(directory)!r} is of epoch 2, past --epochs 1")
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_quickstart_ends_at_the_least_squares_fit():
    run = quickstart.main([])
    x = np.hstack([run["x"], np.ones((len(run["x"]), 1))]).astype(np.float64)
    oracle = np.linalg.lstsq(x, run["y"].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(run["params"]["w"], oracle[:-1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(run["params"]["b"], oracle[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["300"], "unrecognized arguments: 300"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--steps", "nan"], "argument --steps: expected an integer, got 'nan'"),
    (["--learning-rate", "nan"], "argument --learning-rate: must be in [1.18e-38, 3.4e+38]"),
    (["--learning-rate", ""], "argument --learning-rate: expected a number, got ''"),
])
def test_quickstart_bad_flag_exits_2_with_one_line(flags, message, capfd):
    out, _ = main_fails(quickstart.main, flags, capfd, "quickstart.py", message)
    assert out == ""


def test_quickstart_non_finite_loss_stops_at_the_step_it_printed(capfd):
    out, err = main_fails(quickstart.main, ["--learning-rate", "1e30", "--steps", "100"], capfd,
                          "quickstart.py", "the loss is non-finite")
    step = next(int(i) for i, loss in re.findall(r"step +(\d+) +loss (\S+)", out)
                if not math.isfinite(float(loss)))
    assert f"at step {step};" in err, err


@pytest.fixture
def no_distributed_initialize(monkeypatch):
    """Fails a test that reaches jax.distributed.initialize, which would abort this process."""
    def initialize(**kwargs):
        pytest.fail(f"jax.distributed.initialize was reached with {kwargs}")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)


TWO_PROCESSES = ["--num-processes", "2", "--epochs", "1", "--steps", "1"]


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                     ":8476", "127.0.0.1:http", "127.0.0.1:-1", ""])
def test_malformed_coordinator_is_rejected_before_jax_is_asked(address, capfd, no_distributed_initialize):
    main_fails(data_parallel.main, [*TWO_PROCESSES, "--process-id", "1", "--coordinator", address],
               capfd, "data_parallel.py", "argument --coordinator: expected HOST:PORT with a port in "
               f"[1, 65535], got {address!r}")


@pytest.mark.parametrize("flags", [["--coordinator", "127.0.0.1:8476"], ["--timeout", "5"]])
def test_multi_process_flag_with_one_process_is_rejected_rather_than_ignored(flags, capfd):
    main_fails(data_parallel.main, ["--epochs", "1", "--steps", "1", *flags], capfd, "data_parallel.py",
               f"{flags[0]} applies only with --num-processes > 1")


@pytest.mark.parametrize("count", [0, 65537, 2**31])
def test_process_count_outside_1_to_65536_is_rejected(count, capfd, no_distributed_initialize):
    """JAX takes it as a C++ int (2**31 raises TypeError), and 2**31 - 1 processes never start."""
    main_fails(data_parallel.main, ["--num-processes", str(count), "--coordinator", "127.0.0.1:8476"],
               capfd, "data_parallel.py", "argument --num-processes: must be in [1, 65536]",
               f"got {count}")


@pytest.mark.parametrize("value", ["0", "3601", "nan"])
def test_timeout_outside_1_to_3600_seconds_is_rejected(value, capfd, no_distributed_initialize):
    main_fails(data_parallel.main, [*TWO_PROCESSES, "--coordinator", "127.0.0.1:8476",
                                    "--timeout", value], capfd, "data_parallel.py", "argument --timeout")


def test_coordinator_host_that_does_not_resolve_is_one_line(capfd, no_distributed_initialize):
    main_fails(data_parallel.main, [*TWO_PROCESSES, "--process-id", "1", "--coordinator",
                                    "no-such-host.invalid:8476"], capfd, "data_parallel.py",
               "--coordinator no-such-host.invalid:8476: cannot resolve 'no-such-host.invalid'")


def test_process_0_on_an_address_it_cannot_serve_is_one_line(capfd, no_distributed_initialize):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # 192.0.2.1 is TEST-NET-1, documentation only: never an address of this machine.
        for address in (f"127.0.0.1:{port}", "192.0.2.1:8476"):
            main_fails(data_parallel.main, [*TWO_PROCESSES, "--process-id", "0", "--coordinator",
                                            address], capfd, "data_parallel.py",
                       f"--coordinator {address}: process 0 serves the coordinator but cannot listen")


def test_coordinator_nobody_listens_on_fails_within_the_timeout_with_one_line():
    """JAX's own default waits 300 s, then aborts the process with a C++ stack trace."""
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "data_parallel.py"), *TWO_PROCESSES,
                           "--process-id", "1", "--coordinator", address, "--timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert_one_line_error(proc.returncode, proc.stderr, "data_parallel.py",
                          f"--coordinator {address}: nothing answered within 2 s")
    assert 2 <= elapsed < 20, elapsed  # the wait, plus starting Python and importing JAX
