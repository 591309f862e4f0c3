"""The Flax examples train, checkpoint, resume bitwise, and reject bad flags cleanly.

Each example runs in a short mode (a few epochs); the oracles are closed forms (a chance-level
loss, a fixed accuracy bar) and an uninterrupted run of the same command.
"""

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flax", reason="the examples need flax (pip install adamx[examples])")
pytest.importorskip("orbax.checkpoint", reason="checkpointing needs orbax-checkpoint")
pytest.importorskip("sklearn", reason="the digits task needs scikit-learn")

import jax  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import flax_mlp  # noqa: E402
import flax_nnx_mlp  # noqa: E402


def leaves_equal_bitwise(a, b):
    """True when two pytrees of arrays have the same structure and identical bytes per leaf."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x.dtype == y.dtype and x.shape == y.shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


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


def test_run_killed_mid_way_and_resumed_ends_bitwise_equal_to_uninterrupted(tmp_path):
    epochs = "8"
    flags = ["--epochs", epochs, "--quiet"]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "flax_mlp.py"), *flags, "--checkpoint-dir",
         str(killed_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (killed_dir.is_dir() and any(p.name.isdigit() for p in killed_dir.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared within 60 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = [int(p.name) for p in killed_dir.iterdir() if p.name.isdigit()]
    assert max(saved) < int(epochs), "the run finished before it was killed"

    resumed = flax_mlp.main([*flags, "--checkpoint-dir", str(killed_dir), "--resume"])
    uninterrupted = flax_mlp.main(flags)
    assert leaves_equal_bitwise(resumed["params"], uninterrupted["params"])
    assert resumed["history"] == uninterrupted["history"]


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
    (["--compare", "adam,lion"], "unknown optimizer 'lion'"),
    (["--learning-rate", "-0.1"], "--learning-rate: must be a finite number > 0"),
    (["--resume"], "--resume needs --checkpoint-dir"),
])
def test_bad_flag_exits_nonzero_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flax_mlp.main(flags)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_resume_from_missing_dir_prints_one_line_and_no_traceback(tmp_path):
    missing = tmp_path / "never-written"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "flax_mlp.py"), "--resume", "--checkpoint-dir",
         str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
