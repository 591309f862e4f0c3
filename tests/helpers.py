"""Shared test utilities: seeded trees and gradient sequences, and the one harness that runs
steps of an optimizer over a gradient sequence (jitted, or under ``lax.scan``)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def nested_params(dtype=jnp.float32, seed=0):
    """A tree with dicts, lists, tuples and a None, of a few leaf shapes."""
    rng = np.random.default_rng(seed)

    def leaf(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {"dense": {"w": leaf(4, 3), "b": leaf(3)}, "layers": [leaf(2, 2, 2), (leaf(5), None)],
            "scale": leaf()}


def grad_sequence(params, steps, seed=1, scale=1.0):
    """Seeded gradients with the params' structure: a fixed function of the step, not the params."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    return [
        treedef.unflatten([
            jnp.asarray(scale * rng.normal(size=np.shape(x)) * rng.choice([1e-3, 1.0, 30.0]),
                        jnp.result_type(x))
            for x in leaves
        ])
        for _ in range(steps)
    ]


def optax_step(tx, record="params"):
    """A step ``(params, state, grads) -> (params, state, recorded)`` of an optax transformation:
    ``tx.update`` then ``optax.apply_updates``, recording the new params, the updates, or
    nothing (``record=None``)."""
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        return new, state, {"params": new, "updates": updates, None: None}[record]

    return step


def apply_step(**options):
    """The same for ``adamx.apply(grads, state, params, **options)``, recording the new params."""
    import adamx

    def step(params, state, grads):
        params, state = adamx.apply(grads, state, params, **options)
        return params, state, params

    return step


def run(step, params, state, grads_seq, *, scan=False, extra=()):
    """Runs ``step`` over ``grads_seq`` from ``(params, state)``: jitted once and called per step
    (a list of grads trees; returns the records as a list of trees), or (``scan=True``) inside
    one jitted ``lax.scan`` (a list of trees, or one tree whose leaves have a leading axis of
    steps; returns the records stacked likewise). ``extra`` are more arguments of ``step``,
    passed traced (hyperparameters that change without recompiling). Returns ``(records,
    params, state)``. Jitted per step function: a module-level step compiles once."""
    if scan:
        if isinstance(grads_seq, list):
            grads_seq = jax.tree.map(lambda *xs: jnp.stack(xs), *grads_seq)
        return _scanned(step, params, state, grads_seq, tuple(extra))
    history = []
    for grads in grads_seq:
        params, state, recorded = _stepped(step, params, state, grads, tuple(extra))
        history.append(recorded)
    return history, params, state


@functools.partial(jax.jit, static_argnums=0)
def _stepped(step, params, state, grads, extra):
    return step(params, state, grads, *extra)


@functools.partial(jax.jit, static_argnums=0)
def _scanned(step, params, state, stacked, extra):
    def body(carry, grads):
        params, state, recorded = step(*carry, grads, *extra)
        return (params, state), recorded

    (params, state), records = jax.lax.scan(body, (params, state), stacked)
    return records, params, state


def assert_trees_equal(a, b):
    """Same structure, and every leaf equal bit for bit (dtypes included)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                            jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y)


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def wide_params(seed=3):
    """float32 leaves spanning the fused kernel's work split (65,536 elements and up run on
    several threads): a 0-d leaf, an empty one, a matrix, and one of several tasks."""
    rng = np.random.default_rng(seed)
    tree = {f"v{n}": jnp.asarray(rng.normal(size=n), jnp.float32) for n in (1, 7, 256, 8192, 300_013)}
    tree["scalar"] = jnp.float32(0.5)
    tree["empty"] = jnp.zeros((0, 3), jnp.float32)
    tree["matrix"] = jnp.asarray(rng.normal(size=(33, 17)), jnp.float32)
    return tree


def assert_trees_close(actual, expected, *, ulps=8, rtol=2e-6):
    """Same structure, dtypes and shapes, and each leaf within ``rtol`` or ``ulps`` float32 ulps of
    the largest magnitude in its expected leaf (a value near 0 keeps the absolute error of the
    larger values it was computed from)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype, a.shape, e.shape)
        e = np.asarray(e, np.float64)
        atol = ulps * float(np.finfo(np.float32).eps) * float(np.max(np.abs(e), initial=1.0))
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


def nibbles(packed, signed):
    """The 4-bit codes of packed bytes (two per byte along the last axis, element 2j in the low
    nibble), as int64: two's complement nibbles where ``signed``."""
    b = np.asarray(packed).view(np.uint8).astype(np.int64)
    pairs = np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return np.where(pairs > 7, pairs - 16, pairs) if signed else pairs


def run_with_devices(code, devices):
    """Runs the Python source ``code`` in a process of its own with ``devices`` simulated CPU
    devices (the device count is fixed when JAX starts); returns the JSON its last line prints."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def orbax_roundtrip(tree, directory):
    """``tree`` saved with orbax's StandardCheckpointer under ``directory`` and restored into its
    own abstract structure."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "state", tree)
        checkpointer.wait_until_finished()
        return checkpointer.restore(directory / "state", jax.eval_shape(lambda: tree))


def run_worker(name, timeout=300):
    """Runs ``tests/_workers/<name>.py`` on 8 simulated CPU devices in a process of its own and
    returns the JSON object it prints last."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(root, "tests", "_workers", f"{name}.py")],
                            env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_processes(argvs, env, timeout, logs):
    """Runs one process per argument list at once, each writing to its own log file under the
    directory ``logs`` (pipes read one after another could fill and stall the other processes
    of a collective), and kills any still running after ``timeout`` seconds. Returns
    ``(return codes, outputs)``."""
    import subprocess

    procs, files = [], []
    try:
        for rank, argv in enumerate(argvs):
            files.append(open(logs / f"process_{rank}.log", "w+"))
            procs.append(subprocess.Popen(argv, env=env, stdout=files[-1],
                                          stderr=subprocess.STDOUT, text=True))
        for proc in procs:
            proc.wait(timeout=timeout)
        outputs = []
        for log in files:
            log.seek(0)
            outputs.append(log.read())
        return [proc.returncode for proc in procs], outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in files:
            log.close()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
