"""Two processes on 127.0.0.1 train as one, over jax.distributed with gloo CPU collectives.

The test starts both processes of `tests/_workers/two_process_training.py` (two simulated devices
each, so four in all; the batch split over all four, the params and state replicated), on a free
port, bounded in time, and kills both if anything goes wrong. (ZeRO-1 is the same SPMD program
with other shardings; tests/test_sharding.py checks it on 8 devices.) The oracle is
``optax.adam`` run in this process on a single device over the same batches of the same seeded
data (`tests/_workers/mlp.py`).
"""

import importlib.util
import os
import sys

import jax
import numpy as np
import optax
import pytest

from tests.helpers import free_port, run_processes

WORKERS = os.path.join(os.path.dirname(__file__), "_workers")
WORKER = os.path.join(WORKERS, "two_process_training.py")
STEPS, LEARNING_RATE = 10, 1e-2
TIMEOUT_S = 240
# adamx and optax on one device already differ by ~1.5e-6 after these 10 steps (float32
# rounding in a different order); the params move ~0.1.
FLOAT32_TOLERANCE = 1e-5



def load_mlp():
    spec = importlib.util.spec_from_file_location("_workers_mlp", os.path.join(WORKERS, "mlp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_processes(tmp_path):
    """Runs the worker as 2 processes; returns (each process's params, each one's output)."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    codes, outputs = run_processes(
        [[sys.executable, WORKER, str(rank), coordinator, str(STEPS), str(LEARNING_RATE),
          str(tmp_path / f"params_{rank}.npz")] for rank in range(2)], env, TIMEOUT_S, tmp_path)
    for code, output in zip(codes, outputs):
        assert code == 0, output[-4000:]
    params = []
    for rank in range(2):
        with np.load(tmp_path / f"params_{rank}.npz") as saved:
            params.append({key: saved[key] for key in saved.files})
    return params, outputs


def flat(params):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def oracle():
    """optax.adam on a single device in this process, same init, batches and step count."""
    mlp = load_mlp()
    x, y = mlp.synthetic_data()
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        params = mlp.train(optax.adam(LEARNING_RATE), one, x, y, steps=STEPS)
    initial = flat(mlp.init_mlp(jax.random.key(0)))
    moved = max(np.abs(leaf - initial[key]).max() for key, leaf in flat(params).items())
    assert moved > 1e3 * FLOAT32_TOLERANCE  # the params really moved, so equality means something
    return flat(params)


def test_two_processes_final_params_equal_single_process_optax(tmp_path, oracle):
    params, outputs = run_two_processes(tmp_path)
    assert all("devices: 4 in 2 process(es)" in output for output in outputs)
    for rank, found in enumerate(params):
        assert sorted(found) == sorted(oracle)
        for key, value in oracle.items():
            np.testing.assert_allclose(found[key], value, rtol=0, atol=FLOAT32_TOLERANCE,
                                       err_msg=f"process {rank} {key}")
    # Replicated params: both processes hold the same bytes.
    for key in oracle:
        assert params[0][key].tobytes() == params[1][key].tobytes(), key
