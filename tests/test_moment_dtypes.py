"""Low-precision moments: bfloat16 and int8 states train like float32 ones and cost what they say.

The oracle for training is a float64 NumPy Adam (``tests/reference.py``) on a least-squares problem
whose gradient is written in closed form here; the oracle for memory is the count of bytes each
storage format holds by definition.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamx
from tests.reference import ReferenceAdam

STEPS = 300
LR = 5e-2


def least_squares(seed=0):
    """A noisy least-squares problem with an 8,192-element weight (32 int8 blocks)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 64))
    w_true = rng.normal(size=(64, 128))
    y = x @ w_true + 0.3 * rng.normal(size=(256, 128))
    return x, y, 0.1 * rng.normal(size=(64, 128))


def loss64(x, y, w):
    return float(np.mean((x @ w - y) ** 2))


@functools.cache
def reference_losses():
    x, y, w0 = least_squares()
    opt = ReferenceAdam([(w0.shape, False)], lr=LR)
    w, losses = w0.copy(), []
    for _ in range(STEPS):
        grad = 2.0 * x.T @ (x @ w - y) / y.size
        w = w + opt.step([grad], [w])[0]
        losses.append(loss64(x, y, w))
    return np.array(losses)


def adamx_losses(x, y, w0, moment_dtype):
    tx = adamx.adam(LR, mu_dtype=moment_dtype, nu_dtype=moment_dtype)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def step(carry, _):
        w, state = carry
        grad = jax.grad(lambda w: jnp.mean((xj @ w - yj) ** 2))(w)
        updates, state = tx.update(grad, state, w)
        return (w + updates, state), w + updates

    w0 = jnp.asarray(w0, jnp.float32)
    (_, state), ws = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), length=STEPS))(w0)
    ws = np.asarray(ws, np.float64)
    return np.array([loss64(x, y, w) for w in ws]), state


@pytest.mark.parametrize("moment_dtype, transient_bound", [
    (jnp.float32, 2e-4), (jnp.bfloat16, 0.01), ("int8", 0.1),
])
def test_low_precision_states_track_the_float64_oracle_on_least_squares(moment_dtype,
                                                                        transient_bound):
    x, y, w0 = least_squares()
    got, state = adamx_losses(x, y, w0, moment_dtype)
    want = reference_losses()
    if moment_dtype == "int8":
        assert isinstance(state.mu, adamx._quantize.Quantized)
    # while the loss falls ~1000x the trajectories may drift apart a little (8-bit moments are
    # ~0.5% coarse); once converged every state sits on the oracle's loss and at the optimum
    gap = np.abs(got - want) / want
    assert np.max(gap[9:]) < transient_bound
    assert np.max(gap[-50:]) < 1e-4
    optimum = loss64(x, y, np.linalg.lstsq(x, y, rcond=None)[0])
    assert optimum <= got[-1] < optimum * (1 + 1e-4)


def state_bytes(state):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("moment_dtype, per_param", [
    (None, 8.0), (jnp.float32, 8.0), (jnp.bfloat16, 4.0),
    # one uint8 code per element and one float32 scale per 256 elements, for each moment
    ("int8", 2 * (1 + 4 / 256)),
])
def test_state_bytes_per_parameter(moment_dtype, per_param):
    params = {"a": jax.ShapeDtypeStruct((512, 1024), jnp.float32),
              "b": jax.ShapeDtypeStruct((4096, 64), jnp.float32)}
    state = jax.eval_shape(lambda: adamx.init(params, mu_dtype=moment_dtype, nu_dtype=moment_dtype))
    size = sum(math.prod(p.shape) for p in params.values())
    assert state_bytes(state) == per_param * size + 4  # + the int32 count


def test_int8_leaves_below_min_size_cost_float32_bytes():
    params = {"big": jax.ShapeDtypeStruct((5000,), jnp.bfloat16),
              "small": jax.ShapeDtypeStruct((4095,), jnp.bfloat16)}
    state = jax.eval_shape(lambda: adamx.init(params, mu_dtype="int8", nu_dtype="int8",
                                              amsgrad=True))
    blocks = -(-5000 // 256)
    # three moments (mu, nu, nu_max): 8-bit codes plus scales for "big", float32 for "small"
    assert state_bytes(state) == 3 * (5000 + 4 * blocks) + 3 * 4 * 4095 + 4
