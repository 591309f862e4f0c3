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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_two_processes_with_zero1_end_equal_to_single_device_optax(tmp_path):
    """The README's two-process command (with --zero1) against optax.adam on one device."""
    steps, learning_rate = 10, 1e-2
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    coordinator = f"127.0.0.1:{free_port()}"
    saved = tmp_path / "params.npz"
    procs = []
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, str(EXAMPLES / "data_parallel.py"), "--num-processes", "2",
                 "--process-id", str(rank), "--coordinator", coordinator, "--epochs", "1",
                 "--steps", str(steps), "--learning-rate", str(learning_rate), "--zero1",
                 "--save", str(saved)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
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
