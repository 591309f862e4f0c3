"""Low-precision moments: bfloat16, int8 and int4 states train like float32 ones and cost what they
say.

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
    """A noisy least-squares problem with an 8,192-element weight (32 int8 blocks, 256 int4 ones)."""
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
    (jnp.float32, 2e-4), (jnp.bfloat16, 0.01), ("int8", 0.1), ("int4", 0.6),
])
def test_low_precision_states_track_the_float64_oracle_on_least_squares(moment_dtype,
                                                                        transient_bound):
    x, y, w0 = least_squares()
    got, state = adamx_losses(x, y, w0, moment_dtype)
    want = reference_losses()
    if moment_dtype in ("int8", "int4"):
        assert adamx._formats.is_quantized(state.mu) and adamx._formats.is_quantized(state.nu)
    # while the loss falls ~1000x the trajectories may drift apart a little (8-bit codes are a few
    # percent coarse, 4-bit ones more); once converged every state sits on the oracle's loss and
    # at the optimum
    gap = np.abs(got - want) / want
    assert np.max(gap[9:]) < transient_bound
    assert np.max(gap[-50:]) < 1e-4
    optimum = loss64(x, y, np.linalg.lstsq(x, y, rcond=None)[0])
    assert optimum <= got[-1] < optimum * (1 + 1e-4)


def state_bytes(state):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("moment_dtype, per_param", [
    (None, 8.0), (jnp.float32, 8.0), (jnp.bfloat16, 4.0),
    # one byte per element and one float32 scale per 256 elements, for each moment
    ("int8", 2 * (1 + 4 / 256)),
    # first moment: half a byte per element and a bfloat16 per 32; second: half a byte per element
    # and a float32 per row and column (512 + 1024 for "a", 4096 + 64 for "b")
    ("int4", (0.5 + 2 / 32) + 0.5 + 4 * (512 + 1024 + 4096 + 64) / (512 * 1024 + 4096 * 64)),
])
def test_state_bytes_per_parameter(moment_dtype, per_param):
    params = {"a": jax.ShapeDtypeStruct((512, 1024), jnp.float32),
              "b": jax.ShapeDtypeStruct((4096, 64), jnp.float32)}
    state = jax.eval_shape(lambda: adamx.init(params, mu_dtype=moment_dtype, nu_dtype=moment_dtype))
    size = sum(math.prod(p.shape) for p in params.values())
    assert state_bytes(state) == pytest.approx(per_param * size + 4, rel=1e-12)  # + int32 count


def test_int8_leaves_below_min_size_cost_float32_bytes():
    params = {"big": jax.ShapeDtypeStruct((5000,), jnp.bfloat16),
              "small": jax.ShapeDtypeStruct((4095,), jnp.bfloat16)}
    state = jax.eval_shape(lambda: adamx.init(params, mu_dtype="int8", nu_dtype="int8",
                                              amsgrad=True))
    blocks = -(-5000 // 256)
    # three moments (mu, nu, nu_max): 8-bit codes plus scales for "big", float32 for "small"
    assert state_bytes(state) == 3 * (5000 + 4 * blocks) + 3 * 4 * 4095 + 4


@pytest.mark.parametrize("spec", [adamx.int8_moments(min_size=0), adamx.int4_moments(min_size=0)])
def test_a_scalar_leaf_keeps_float32_moments_even_with_min_size_0(spec):
    # a 0-d leaf has no block to share: it stays float32, and trains as with float32 moments
    params = {"s": jnp.float32(1.0), "w": jnp.ones((4, 8))}
    quantized, plain = adamx.adam(0.1, mu_dtype=spec, nu_dtype=spec), adamx.adam(0.1)
    q_state, p_state = quantized.init(params), plain.init(params)
    assert q_state.mu["s"].dtype == q_state.nu["s"].dtype == jnp.float32
    for t in range(5):
        grads = {"s": jnp.float32(0.3 - 0.1 * t), "w": jnp.full((4, 8), 0.1 * t)}
        q_updates, q_state = quantized.update(grads, q_state, params)
        p_updates, p_state = plain.update(grads, p_state, params)
        np.testing.assert_array_equal(q_updates["s"], p_updates["s"])


def test_int4_keeps_in_8bit_blocks_of_its_block_size_what_4_bits_do_not_suit():
    params = {"odd": jax.ShapeDtypeStruct((64, 129), jnp.float32),     # odd last dimension
              "flat": jax.ShapeDtypeStruct((8192,), jnp.float32),      # 1-D: no rows and columns
              "thin": jax.ShapeDtypeStruct((2, 8192), jnp.float32)}    # rows + columns > size / 32
    state = jax.eval_shape(lambda: adamx.init(params, mu_dtype="int4", nu_dtype="int4"))
    blocks8 = lambda n, b: n + 4 * -(-n // b)  # noqa: E731
    assert state_bytes(state.mu["odd"]) == blocks8(64 * 129, 32)
    assert state_bytes(state.nu["odd"]) == 64 * 65 + 4 * (64 + 129)  # rank-1 pads the last axis
    assert state_bytes(state.mu["flat"]) == 8192 // 2 + 2 * 8192 // 32
    assert state_bytes(state.nu["flat"]) == blocks8(8192, 32)
    assert state_bytes(state.nu["thin"]) == blocks8(2 * 8192, 32)


def test_a_float16_second_moment_is_refused_where_it_would_underflow():
    # (1 - b2) g**2 = 1e-9 for g = 1e-3 underflows float16 to 0, and the step divides by eps:
    # an update of 1e2 from a learning rate of 1e-3
    with pytest.raises(ValueError, match="adamx.adam: nu_dtype must be one of .*got float16 "
                                         r"\(a float16 second moment underflows"):
        adamx.adam(1e-3, nu_dtype=jnp.float16)
    state = adamx.init({"w": jnp.ones(3)}, nu_dtype=jnp.bfloat16)
    state = state.replace(nu={"w": state.nu["w"].astype(jnp.float16)})
    with pytest.raises(ValueError, match=r"adamx.update: state.nu\['w'\] is float16"):
        adamx.update({"w": jnp.full(3, 1e-3)}, state, learning_rate=1e-3)


def test_a_state_stored_otherwise_than_the_transformation_stores_it_is_refused():
    # a float32 state restored into a bfloat16-moment transformation used to train on in float32
    params = {"w": jnp.ones((64, 128))}
    tx = adamx.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"adamx.adam: state.mu\['w'\] is a float32\[64, 128\], "
                                         r"but this transformation keeps mu_dtype=bfloat16"):
        tx.update(params, adamx.adam(1e-3).init(params))
    quantized = adamx.adam(1e-3, mu_dtype="int8")
    with pytest.raises(ValueError, match=r"state.mu\['w'\] is an Int4Blocks, but this "
                                         r"transformation keeps mu_dtype=Int8Spec"):
        quantized.update(params, adamx.adam(1e-3, mu_dtype="int4").init(params))
    with pytest.raises(ValueError, match=r"adamx.adam: state.mu\['w'\] is an Int8Blocks, but "
                                         r"this transformation keeps mu_dtype=None"):
        adamx.adam(1e-3).update(params, quantized.init(params))
    # the transformation's own state, and the functional update with any state, pass
    tx.update(params, tx.init(params))
    adamx.update(params, quantized.init(params), learning_rate=1e-3)


@pytest.mark.parametrize("adamax", [False, True])
def test_a_bfloat16_second_moment_decays_as_the_closed_form_says(adamax):
    # At b2 = 0.999 a step changes v by less than half a bfloat16 ulp once v is about g**2 / 3:
    # rounded to nearest, v would stop there (and AdaMax's max(b2 u, |g|) would never decay).
    # Stochastically rounded, v is unbiased: under g = 1 its mean over 8,192 elements follows
    # 1 - b2**t, and AdaMax's u after g drops from 1 to 0 follows b2**t.
    n, steps, b2 = 8192, 1500, 0.999
    params = jnp.zeros(n)
    state = adamx.init(params, nu_dtype=jnp.bfloat16)
    grads = jnp.concatenate([jnp.ones((1 if adamax else steps, n)),
                             jnp.zeros((steps if adamax else 0, n))])

    def step(state, g):
        _, state = adamx.update(g, state, learning_rate=0.1, b2=b2, adamax=adamax)
        return state, None

    state, _ = jax.lax.scan(step, state, grads)
    want = b2**steps if adamax else 1 - b2**steps  # 0.223 and 0.777
    assert abs(float(jnp.mean(state.nu.astype(jnp.float32))) - want) < 0.01 * want
