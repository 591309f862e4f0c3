"""Two processes on 127.0.0.1 train as one: `examples/data_parallel.py` over jax.distributed.

The test starts both processes of the example itself (gloo CPU collectives, two simulated devices
each, so four in all; the batch split over all four, the params and state replicated), on a free
port, bounded in time, and kills both if anything goes wrong. (ZeRO-1 is the same SPMD program
with other shardings; tests/test_sharding.py checks it on 8 devices.) The oracle is
``optax.adam`` run in this process on a single device over the same batches.
"""

import importlib.util
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
EXAMPLE = os.path.join(EXAMPLES, "data_parallel.py")
STEPS, LEARNING_RATE = 10, 1e-2
TIMEOUT_S = 240
# adamx and optax on one device already differ by ~1.5e-6 after these 10 steps (float32
# rounding in a different order); the params move ~0.1.
FLOAT32_TOLERANCE = 1e-5


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_example():
    sys.path.insert(0, EXAMPLES)
    try:
        spec = importlib.util.spec_from_file_location("data_parallel", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(EXAMPLES)
    return module


def run_two_processes(tmp_path, *extra):
    """Runs the example as 2 processes; returns (saved params, each process's stdout)."""
    coordinator = f"127.0.0.1:{free_port()}"
    saved = tmp_path / "params.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    procs, logs = [], []
    try:
        for rank in range(2):
            log = open(tmp_path / f"process_{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, EXAMPLE, "--num-processes", "2", "--process-id", str(rank),
                 "--coordinator", coordinator, "--epochs", "1", "--steps", str(STEPS),
                 "--learning-rate", str(LEARNING_RATE), "--save", str(saved), *extra],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        for proc, output in zip(procs, outputs):
            assert proc.returncode == 0, output[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    with np.load(saved) as params:
        return {key: params[key] for key in params.files}, outputs


@pytest.fixture(scope="module")
def oracle():
    """optax.adam on a single device in this process, same init, batches and step count."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    example = load_example()
    data = example.load_task("digits")
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        params = example.train(optax.adam(LEARNING_RATE), one, data, epochs=1, batch_size=128,
                               max_steps=STEPS, log=lambda line: None)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def test_two_processes_final_params_equal_single_process_optax(tmp_path, oracle):
    params, outputs = run_two_processes(tmp_path)
    assert sorted(params) == sorted(oracle)
    for key, value in oracle.items():
        np.testing.assert_allclose(params[key], value, rtol=0, atol=FLOAT32_TOLERANCE, err_msg=key)
    assert all("devices: 4 in 2 process(es)" in output for output in outputs)
    checksums = [re.findall(r"params checksum: (\S+)", output) for output in outputs]
    assert checksums[0] == checksums[1] and len(checksums[0]) == 1
