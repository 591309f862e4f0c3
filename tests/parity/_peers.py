"""Run optimizers from adamx and its peers on identical gradients; return NumPy trajectories.

Every runner takes the same inputs (initial parameters as a dict of NumPy arrays, and a gradient
source) and returns a dict mapping each leaf name to an array of shape ``[steps, *leaf_shape]``:
the parameters after every step. The module imports only NumPy at the top, so it serves both the
pytest process and the float64 subprocess (``_float64_cases.py``).
"""

import os

import numpy as np

STEPS = 64
# A power of two, so Keras's float32 learning-rate variable holds it exactly in float64 runs.
LR = 2.0**-7
WD = 0.1

# Leaf shapes and gradient scales. The 1e-6 leaf makes epsilon's placement matter (sqrt(v) is
# comparable to eps there); the others cover ordinary and large gradients.
LEAVES = {
    "scalar": ((), 1.0),
    "tiny": ((7,), 1e-6),
    "matrix": ((4, 5), 1e-2),
    "tensor": ((2, 3, 4), 10.0),
}


def initial_params(seed, dtype):
    """Parameters in [2, 3], far from zero so relative errors are well defined."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(2.0, 3.0, shape).astype(dtype) for name, (shape, _) in LEAVES.items()}


def gradient_sequence(seed, dtype, steps=STEPS):
    """A fixed list of gradient dicts, one per step, independent of the parameters.

    Each step's magnitude is multiplied by a log-normal factor, so the second moment rises and
    falls and AMSGrad's running maximum is active.
    """
    rng = np.random.default_rng(seed + 1000)
    grads = []
    for _ in range(steps):
        step_scale = np.exp(1.5 * rng.standard_normal())
        grads.append(
            {
                name: (scale * step_scale * rng.standard_normal(shape)).astype(dtype)
                for name, (shape, scale) in LEAVES.items()
            }
        )
    return grads


class FixedGradients:
    """Gradients that are a fixed function of the step (identical for every optimizer)."""

    def __init__(self, sequence):
        self.sequence = sequence
        self.steps = len(sequence)

    def numpy(self, step, params):
        del params
        return self.sequence[step]

    def jax_stacked(self):
        import jax.numpy as jnp

        return {k: jnp.asarray(np.stack([g[k] for g in self.sequence])) for k in self.sequence[0]}

    def jax(self, step, params, stacked):
        del params
        return {k: v[step] for k, v in stacked.items()}


class QuadraticGradients:
    """Gradients of 0.5 * sum(a * (p - c)**2), which depend on each optimizer's own parameters.

    JAX differentiates the loss with ``jax.grad``; the peers get the closed form a * (p - c)
    evaluated on their own current parameters.
    """

    def __init__(self, seed, dtype, steps=STEPS):
        rng = np.random.default_rng(seed + 2000)
        self.curvature = {
            name: (scale * rng.uniform(0.5, 2.0, shape)).astype(dtype)
            for name, (shape, scale) in LEAVES.items()
        }
        self.center = {
            name: rng.uniform(3.5, 4.5, shape).astype(dtype) for name, (shape, _) in LEAVES.items()
        }
        self.steps = steps
        self._grad = None

    def numpy(self, step, params):
        del step
        return {k: self.curvature[k] * (params[k] - self.center[k]) for k in params}

    def jax_stacked(self):
        return None

    def jax(self, step, params, stacked):
        del step, stacked
        if self._grad is None:
            import jax
            import jax.numpy as jnp

            def loss(p):
                return sum(0.5 * jnp.sum(self.curvature[k] * jnp.square(p[k] - self.center[k])) for k in p)

            # Compiled once and reused by every case that runs on this source.
            self._grad = jax.jit(jax.grad(loss))
        return self._grad(params)


def run_optax(tx, params0, source):
    """Run an optax GradientTransformation (adamx or optax) step by step.

    Eager on purpose: each case builds a new transformation, and compiling every one costs more
    than the 64 steps themselves. The jit path is covered by the Keras example test.
    """
    import jax.numpy as jnp
    import optax

    stacked = source.jax_stacked()
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    state = tx.init(params)
    path = []
    for t in range(source.steps):
        grads = source.jax(t, params, stacked)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        path.append(params)
    return {k: np.stack([np.asarray(p[k]) for p in path]) for k in params0}


def run_torch(make_optimizer, params0, source):
    """Run a torch.optim optimizer; ``make_optimizer(list_of_tensors)`` builds it."""
    import torch

    names = list(params0)
    tensors = [torch.nn.Parameter(torch.from_numpy(params0[k].copy())) for k in names]
    opt = make_optimizer(tensors)
    path = {k: [] for k in names}
    for t in range(source.steps):
        current = {k: p.detach().numpy() for k, p in zip(names, tensors)}
        grads = source.numpy(t, current)
        for k, p in zip(names, tensors):
            p.grad = torch.from_numpy(np.array(grads[k]))
        opt.step()
        for k, p in zip(names, tensors):
            path[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in path.items()}


def import_keras():
    """Import Keras on the JAX backend (the backend is fixed at Keras's first import)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras is on the {keras.backend.backend()} backend, not jax")
    return keras


def run_keras(make_optimizer, params0, source, *, prepare=None):
    """Run a keras.optimizers optimizer; ``prepare(opt)`` may configure it before it is built.

    Steps go through ``stateless_apply`` under ``jax.jit``, the path ``Model.fit`` takes on the
    JAX backend (and much faster than eager ``apply``).
    """
    import jax

    keras = import_keras()

    names = list(params0)
    variables = [keras.Variable(params0[k], dtype=str(params0[k].dtype), name=k) for k in names]
    opt = make_optimizer()
    if prepare is not None:
        prepare(opt)
    opt.build(variables)
    step = jax.jit(opt.stateless_apply)
    values = [v.value for v in variables]
    opt_values = [v.value for v in opt.variables]
    path = {k: [] for k in names}
    for t in range(source.steps):
        grads = source.numpy(t, {k: np.asarray(v) for k, v in zip(names, values)})
        values, opt_values = step(opt_values, [grads[k] for k in names], values)
        for k, v in zip(names, values):
            path[k].append(np.asarray(v))
    return {k: np.stack(v) for k, v in path.items()}


def max_relative_error(actual, expected):
    """The largest |actual - expected| / |expected| over all leaves and steps."""
    return max(
        float(np.max(np.abs(actual[k].astype(np.float64) - expected[k]) / np.abs(expected[k])))
        for k in expected
    )


def assert_trajectories_close(actual, expected, rtol):
    """Assert every leaf agrees to ``rtol`` relative after every step; name the first failure."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for k in expected:
        a, e = actual[k], expected[k]
        assert a.shape == e.shape and a.dtype == e.dtype, (k, a.shape, a.dtype, e.shape, e.dtype)
        err = np.abs(a.astype(np.float64) - e) / np.abs(e)
        bad = np.argwhere(err > rtol)
        if bad.size:
            step = int(bad[0][0])
            raise AssertionError(
                f"leaf {k!r} first differs at step {step + 1}: relative error "
                f"{err[step].max():.3g} > {rtol:g} (worst over all steps {err.max():.3g})"
            )
