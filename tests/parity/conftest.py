"""Shared fixtures for the parity suite: Keras's backend, gradient sequences, float64 results."""

import json
import os
import pathlib
import subprocess
import sys

# Keras picks its backend at first import; every parity test runs it on JAX.
os.environ["KERAS_BACKEND"] = "jax"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ._peers import FixedGradients, QuadraticGradients, gradient_sequence, initial_params  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def params32():
    """Initial float32 parameters, one leaf per shape in ``_peers.LEAVES``."""
    return initial_params(0, np.float32)


@pytest.fixture(scope="session")
def fixed_grads32():
    """A fixed float32 gradient sequence (a function of the step only)."""
    return FixedGradients(gradient_sequence(0, np.float32))


@pytest.fixture(scope="session")
def quadratic_grads32():
    """Gradients of a quadratic loss, evaluated at each optimizer's own parameters."""
    return QuadraticGradients(0, np.float32)


_FLOAT64 = {}


def _float64_process():
    """Start (once per process) the x64 subprocess that runs every float64 case."""
    if "proc" not in _FLOAT64:
        env = dict(os.environ, JAX_ENABLE_X64="1", KERAS_BACKEND="jax")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        _FLOAT64["proc"] = subprocess.Popen(
            [sys.executable, "-m", "tests.parity._float64_cases"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return _FLOAT64["proc"]


def pytest_collection_finish(session):
    """Start the float64 subprocess early, so it runs alongside the float32 tests.

    Only in the main process: pytest-xdist workers start it when a test first needs it.
    """
    if not hasattr(session.config, "workerinput") and any(
        "float64_errors" in getattr(item, "fixturenames", ()) for item in session.items
    ):
        _float64_process()


def pytest_sessionfinish(session):
    proc = _FLOAT64.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="session")
def float64_errors():
    """Largest relative error of every float64 case, from a fresh x64 process."""
    proc = _float64_process()
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"float64 subprocess timed out after 300 s:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def check_float64(float64_errors):
    """A function asserting that one ``"peer/case"`` agreed to 1e-10 relative in float64."""

    def check(key, rtol=1e-10):
        err = float64_errors[key]
        assert err is not None, f"{key.split('/')[0]} is not installed (the `parity` extra)"
        assert not isinstance(err, str), f"{key}: {err}"
        assert err <= rtol, f"{key}: float64 relative error {err:.3g} > {rtol:g}"

    return check
