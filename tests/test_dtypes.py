"""Dtype safety: low-precision leaves, moment storage dtypes, complex leaves, count saturation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.reference import run_reference

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64]
MOMENT_DTYPES = [None, jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_zero_grad_gives_zero_update(dtype):
    params = jnp.ones(4, dtype)
    updates, state = adamx.update(jnp.zeros(4, dtype), adamx.init(params), learning_rate=1e-3)
    assert updates.dtype == dtype
    np.testing.assert_array_equal(np.asarray(updates, np.float32), 0.0)


def test_optax_gives_nan_where_adamx_gives_zero_for_a_float16_zero_gradient():
    # The deviation the README documents: optax 0.2.8 forms eps + sqrt(0) in float16, where 1e-8
    # rounds to 0, so a zero gradient steps by 0 / 0 (optax issue 1754). When optax widens its
    # denominator this fails, and the README's table of deviations loses a row.
    params, grads = jnp.ones(4, jnp.float16), jnp.zeros(4, jnp.float16)
    theirs, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params))
    ours, _ = adamx.adam(1e-3).update(grads, adamx.adam(1e-3).init(params))
    assert np.all(np.isnan(np.asarray(theirs, np.float32)))
    np.testing.assert_array_equal(np.asarray(ours, np.float32), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu_dtype", MOMENT_DTYPES)
@pytest.mark.parametrize("nu_dtype", MOMENT_DTYPES)
def test_dtypes_stay_fixed_and_track_the_reference(dtype, mu_dtype, nu_dtype):
    rng = np.random.default_rng(0)
    shape = (8,)
    real = jnp.finfo(dtype).dtype
    p0 = rng.normal(size=shape) + (1j * rng.normal(size=shape) if dtype == jnp.complex64 else 0)
    grads = [rng.normal(size=shape) + (1j * rng.normal(size=shape) if dtype == jnp.complex64
                                        else 0) for _ in range(20)]
    tx = adamx.adam(1e-2, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    params = jnp.asarray(p0, dtype)
    state = tx.init(params)
    want_mu = dtype if mu_dtype is None else mu_dtype
    if dtype == jnp.complex64:
        want_mu = jnp.complex64  # a complex first moment keeps its imaginary part
    want_nu = nu_dtype or (jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else real)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(jnp.asarray(g, dtype), state)
        assert updates.dtype == dtype
        assert state.mu.dtype == want_mu and state.nu.dtype == want_nu
        assert state.count.dtype == jnp.int32
        params = optax.apply_updates(params, updates)
    ref = run_reference([[g] for g in grads], [np.asarray(params.dtype.type(0)) + p0.astype(
        np.complex128 if dtype == jnp.complex64 else np.float64)], lr=1e-2)[-1][0]
    # Tolerance: the coarsest of the leaf and moment precisions, over 20 lr-sized steps.
    eps = max(float(jnp.finfo(d).eps) for d in (real, want_nu, jnp.finfo(want_mu).dtype))
    np.testing.assert_allclose(np.asarray(params, np.complex128), ref, atol=max(40 * eps, 1e-5))


def test_complex_second_moment_is_real_squared_modulus():
    g = jnp.array([3 + 4j, 1j], jnp.complex64)
    _, state = adamx.update(g, adamx.init(g), learning_rate=1.0, b2=0.5)
    assert state.nu.dtype == jnp.float32
    np.testing.assert_allclose(state.nu, 0.5 * np.abs(np.asarray(g)) ** 2, rtol=1e-6)


def test_count_saturates_at_int32_max_and_updates_stay_finite():
    params = jnp.ones(3)
    state = adamx.init(params).replace(count=jnp.asarray(np.iinfo(np.int32).max - 1, jnp.int32))
    for _ in range(3):
        updates, state = adamx.update(jnp.ones(3), state, learning_rate=1e-3)
        assert np.isfinite(np.asarray(updates)).all()
    assert int(state.count) == np.iinfo(np.int32).max


def test_bias_correction_is_accurate_in_float32_for_b2_near_one():
    # Against float64 1 - b**t: a float32 direct form is off by up to ~330 ulps at b = 0.999.
    from adamx._numerics import bias_correction, one_minus

    t = jnp.arange(1, 5001, dtype=jnp.int32)
    for b in (0.9, 0.999, 0.99999):
        got = np.asarray(bias_correction(one_minus(b), t, jnp.float32), np.float64)
        want = 1 - np.float64(b) ** np.arange(1, 5001)
        assert np.max(np.abs(got / want - 1)) < 8 * 2.0**-24


def test_update_is_clean_under_strict_dtype_promotion():
    params = {"h": jnp.ones(3, jnp.float16), "f": jnp.ones(2), "c": jnp.ones(2, jnp.complex64)}
    with jax.numpy_dtype_promotion("strict"):
        for tx in (adamx.adamw(1e-3), adamx.amsgrad(1e-3), adamx.nadam(1e-3), adamx.adamax(1e-3)):
            tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_default_second_moment_of_16_bit_params_is_float32_and_tracks_the_reference(dtype):
    # In float16, (1 - b2) g^2 underflows for |g| < 1e-3; in bfloat16, 0.999 v rounds back to v.
    g = np.full(4, 1e-4 if dtype == jnp.float16 else 1.0)
    state = adamx.init(jnp.zeros(4, dtype))
    assert state.nu.dtype == jnp.float32
    for t in range(1, 301):
        _, state = adamx.update(jnp.asarray(g * (t <= 10), dtype), state, learning_rate=1e-3)
    want = (1 - 0.999) * np.asarray(g, np.float64) ** 2 * sum(0.999 ** (300 - t) for t in range(1, 11))
    np.testing.assert_allclose(np.asarray(state.nu, np.float64), want, rtol=1e-2)


def test_python_scalar_params_are_accepted():
    state = adamx.init({"w": 1.0})
    updates, _ = adamx.update({"w": 2.0}, state, learning_rate=0.1)
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-6)


def test_integer_and_boolean_params_are_not_trained_and_keep_no_moments():
    params = {"w": jnp.linspace(-1, 1, 4), "steps": jnp.int32(7), "on": jnp.array([True, False])}
    tx = adamx.adam(0.1)
    state = tx.init(params)
    assert state.mu["steps"] is None and state.nu["on"] is None
    assert sum(x.size for x in jax.tree.leaves(state)) == 1 + 2 * 4  # count, mu and nu of w
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    assert grads["steps"].dtype == jax.dtypes.float0
    updates, _ = jax.jit(tx.update)(grads, state, params)
    # float0 gradients: zero updates in the params' own dtypes, which optax.apply_updates can add
    assert updates["steps"].dtype == jnp.int32 and updates["on"].dtype == jnp.bool_
    new = optax.apply_updates(params, updates)
    assert int(new["steps"]) == 7 and new["on"].tolist() == [True, False]
    # without the params, int32 zeros, which apply_updates adds to any integer or boolean param
    updates, _ = tx.update(grads, state)
    assert updates["steps"].dtype == updates["on"].dtype == jnp.int32
    assert optax.apply_updates(params, updates)["on"].tolist() == [True, False]
    # integer gradients: zero integer updates, and apply_updates leaves the params as they are
    int_grads = {**grads, "steps": jnp.int32(3), "on": jnp.array([1, 1], jnp.int32)}
    updates, _ = tx.update(int_grads, state, params)
    new = optax.apply_updates(params, updates)
    assert int(new["steps"]) == 7 and new["on"].tolist() == [True, False]
    # the float leaf steps as optax.adam steps it alone (to optax's float32 bias correction)
    peer = optax.adam(0.1)
    want, _ = peer.update(grads["w"], peer.init(params["w"]))
    np.testing.assert_allclose(updates["w"], want, rtol=2e-5)


def test_complex_mu_dtype_is_honoured_and_steps_like_optax():
    params = {"w": jnp.linspace(-1, 1, 4), "z": jnp.linspace(-1, 1, 4) * (1 + 1j)}
    grads = jax.tree.map(lambda x: jnp.cos(x) * 0.5, params)
    tx, peer = adamx.adam(0.1, mu_dtype=jnp.complex64), optax.adam(0.1, mu_dtype=jnp.complex64)
    state = tx.init(params)
    assert state.mu["w"].dtype == state.mu["z"].dtype == jnp.complex64
    assert state.nu["w"].dtype == state.nu["z"].dtype == jnp.float32
    updates, state = tx.update(grads, state)
    want, _ = peer.update(grads, peer.init(params))
    # updates in the gradients' dtype (optax's are complex for the real leaf too), equal values
    # to optax's float32 bias correction
    assert updates["w"].dtype == jnp.float32 and updates["z"].dtype == jnp.complex64
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5)


def test_a_python_number_param_steps_as_optax_steps_it():
    # init and optax accept a Python float leaf; the update treats it as the array JAX makes of it.
    params = {"w": jnp.ones(3), "scale": 1.5}
    grads = jax.grad(lambda p: jnp.sum(p["w"] * p["scale"] ** 2))(params)
    for mine, theirs in ((adamx.adam(0.1), optax.adam(0.1)),
                         (adamx.adamw(0.1, weight_decay=0.1), optax.adamw(0.1, weight_decay=0.1))):
        got, _ = mine.update(grads, mine.init(params), params)
        want, _ = theirs.update(grads, theirs.init(params), params)
        np.testing.assert_allclose(got["scale"], want["scale"], rtol=1e-5)  # optax: float32 1 - b2
