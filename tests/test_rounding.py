"""bfloat16 and float16 params that do not lose their updates: stochastic rounding and Kahan.

Oracles: closed forms (the neighbours of a value in bfloat16, the probability of rounding up),
NumPy float64 sums, and the float64 Adam of ``tests/reference.py``; never adamx's own output.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adamx
from tests.helpers import optax_step, orbax_roundtrip, run
from tests.reference import ReferenceAdam

BF16 = ml_dtypes.bfloat16


def neighbours(x, dtype):
    """The two values of ``dtype`` around each float64 ``x`` (equal when x is one of them)."""
    x = np.asarray(x, np.float64)
    near = x.astype(dtype).astype(np.float64)
    other = np.where(near > x, np.nextafter(near.astype(dtype), np.asarray(-np.inf, dtype)),
                     np.nextafter(near.astype(dtype), np.asarray(np.inf, dtype))).astype(np.float64)
    return np.minimum(near, other), np.maximum(near, other)


def first_step(params, lr, *, rounding, seed=0):
    """One Adam step whose update is exactly -lr for every element (g = 1, eps negligible)."""
    tx = adamx.adam(lr, eps=0.0, param_rounding=rounding, seed=seed)
    updates, state = jax.jit(tx.update)(jnp.ones_like(params), tx.init(params), params)
    return updates, optax.apply_updates(params, updates)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    # The first Adam step with eps = 0 is exactly -lr: the exact new value is p0 - lr.
    n, p0, lr = 200_000, 1.0, 1e-3
    params = jnp.full(n, p0, dtype)
    _, new = first_step(params, lr, rounding="stochastic")
    exact = np.float64(np.float32(p0) - np.float32(lr))
    lo, hi = neighbours(exact, jnp.dtype(dtype))
    values = np.asarray(new, np.float64)
    assert set(np.unique(values)) <= {lo, hi}
    p_up = (exact - lo) / (hi - lo)
    sigma = np.sqrt(p_up * (1 - p_up) / n)
    assert abs(np.mean(values == hi) - p_up) < 5 * sigma
    assert abs(np.mean(values) - exact) < 5 * sigma * (hi - lo)


def test_stochastic_rounding_is_a_function_of_seed_and_step_only():
    params = jnp.full(4096, 1.0, jnp.bfloat16)
    runs = [first_step(params, 1e-3, rounding="stochastic", seed=s)[1] for s in (0, 0, 1)]
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(runs[1]))
    assert np.mean(np.asarray(runs[0]) != np.asarray(runs[2])) > 0.1


def adam_steps(params, grads, *, rounding, lr):
    """Adam over the gradient sequence ``grads`` (steps x n) in one lax.scan."""
    tx = adamx.adam(lr, param_rounding=rounding)
    grads = jnp.asarray(grads).astype(params.dtype)
    _, p, state = run(optax_step(tx, record=None), params, tx.init(params), grads, scan=True)
    return np.asarray(p, np.float64), state


def reference_params(params, grads, lr):
    params = np.asarray(params, np.float64)
    opt = ReferenceAdam([(params.shape, False)], lr=lr)
    for g in np.asarray(grads, np.float64):
        params = params + opt.step([g], [params])[0]
    return params


def test_a_thousand_sub_ulp_steps_land_where_the_float64_sum_says_with_stochastic_rounding():
    # Each step is about lr = 1e-4, a 39th of bfloat16's gap below 1: round to nearest loses
    # every one of them, stochastic rounding keeps them on average.
    n, steps, lr = 4096, 1000, 1e-4
    rng = np.random.default_rng(0)
    grads = jnp.asarray(1.0 + 0.1 * rng.normal(size=(steps, n)), jnp.float32)
    params = jnp.full(n, 1.0, jnp.bfloat16)
    want = reference_params(params, np.asarray(grads, np.float64).astype(BF16), lr)
    nearest, _ = adam_steps(params, grads, rounding="nearest", lr=lr)
    np.testing.assert_array_equal(nearest, 1.0)  # stalled: not one step survived
    stochastic, _ = adam_steps(params, grads, rounding="stochastic", lr=lr)
    # each element's rounding noise has variance <= gap**2 / 4 per step
    gap = 2.0**-8
    sigma = gap / 2 * np.sqrt(steps / n)
    assert abs(np.mean(stochastic) - np.mean(want)) < 5 * sigma
    assert np.mean(want) < 1 - 0.09  # it did move about steps * lr


def test_kahan_keeps_1e5_sub_ulp_steps_within_one_bfloat16_ulp_of_the_float64_sum():
    n, steps, lr = 64, 100_000, 2e-4
    rng = np.random.default_rng(1)
    grads = jnp.asarray(0.02 + rng.normal(size=(steps, n)), jnp.bfloat16)
    params = jnp.asarray(rng.uniform(2.0, 3.0, size=n), jnp.bfloat16)
    want = reference_params(params, grads, lr)
    kahan, state = adam_steps(params, grads, rounding="kahan", lr=lr)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want))) - 7)
    assert np.max(np.abs(kahan - want) / ulp) <= 1.0
    assert state.compensation.dtype == jnp.bfloat16
    nearest, _ = adam_steps(params, grads, rounding="nearest", lr=lr)
    assert np.max(np.abs(nearest - want) / ulp) > 10  # the control: nearest loses the steps


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("dtype, grad_dtype", [(jnp.bfloat16, jnp.bfloat16),
                                               (jnp.float16, jnp.float16),
                                               (jnp.bfloat16, jnp.float32)])
def test_apply_updates_lands_exactly_on_the_rounded_param(rounding, dtype, grad_dtype):
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(64, 32)), dtype),
              "b": jnp.asarray(rng.normal(size=32), jnp.float32)}
    # float32 moments, so the float64 oracle sees the same Adam (the default would keep m in the
    # params' 16 bits)
    tx = adamx.adamw(3e-3, weight_decay=0.1, mu_dtype=jnp.float32, param_rounding=rounding)
    state = tx.init(params)
    step = jax.jit(tx.update)
    ref = ReferenceAdam([((64, 32), False)], lr=3e-3, weight_decay=0.1)
    for _ in range(5):
        grads = {"w": jnp.asarray(rng.normal(size=(64, 32)), grad_dtype),
                 "b": jnp.asarray(rng.normal(size=32), jnp.float32)}
        old = np.asarray(params["w"], np.float64)
        comp = 0.0 if state.compensation is None else np.asarray(state.compensation["w"], np.float64)
        updates, state = step(grads, state, params)
        assert updates["w"].dtype == grad_dtype  # as optax: the gradients' dtype
        new = optax.apply_updates(params, updates)
        landed = np.asarray(new["w"], np.float64)
        # the new param is a rounding of the float64 Adam step (plus the compensation) ...
        target = old + ref.step([np.asarray(grads["w"], np.float64)], [old])[0] + comp
        lo, hi = neighbours(target, jnp.dtype(dtype))
        # float32 vs float64: the step, and old + step rounded to float32 (2**-24 of old)
        tiny = 1e-4 * (hi - lo) + 2.0**-23 * np.abs(old)
        # Where old and new are within a factor of 2 (Sterbenz), their difference is exact in
        # any float format; with float32 updates, wherever they are within 2**16.
        ratio = np.abs(target) / np.maximum(np.abs(old), 1e-30)
        exact = (np.sign(target) == np.sign(old)) & (
            (ratio >= 0.5) & (ratio <= 2) if grad_dtype != jnp.float32 else ratio >= 2.0**-16)
        assert np.mean(exact) > 0.99
        assert np.all(((landed >= lo - tiny) & (landed <= hi + tiny))[exact])
        # ... and there apply_updates' add was exact: old + u is the rounded param itself
        sums = old + np.asarray(updates["w"], np.float64)
        np.testing.assert_array_equal(sums[exact], landed[exact])
        # elsewhere (a param crossing zero) it lands within half an ulp of the update
        u_ulp = np.abs(np.asarray(updates["w"], np.float64)) * 2.0 ** -jnp.finfo(grad_dtype).nmant
        assert np.all((np.abs(landed - target) <= hi - lo + u_ulp)[~exact])
        if rounding == "kahan":
            # nearest rounding, and the compensation holds what the param could not
            assert np.all((np.abs(landed - target) <= (hi - lo) / 2 + tiny)[exact])
            residual = np.asarray(state.compensation["w"], np.float64)
            r_lo, r_hi = neighbours(target - landed, jnp.dtype(dtype))  # its own rounding
            assert np.all(np.abs(residual - (target - landed)) <= (r_hi - r_lo) / 2 + tiny)
            assert state.compensation["b"] is None  # float32 params need none
        params = new


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_rounding_holds_under_apply_scan_multisteps_apply_if_finite_and_donation(rounding):
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16), "i": jnp.arange(3)}
    grads = [{"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
              "i": jnp.zeros(3, jnp.int32)} for _ in range(6)]
    tx = adamx.adam(1e-3, param_rounding=rounding)

    def loop(tx, gs, scan=False):
        return run(optax_step(tx), params, tx.init(params), gs, scan=scan)[1]

    want = loop(tx, grads)
    # adamx.apply, jitted with donation, gives the same bits
    apply = jax.jit(lambda p, s, g: adamx.apply(g, s, p, learning_rate=1e-3,
                                                param_rounding=rounding), donate_argnums=(0, 1))
    got, state = jax.tree.map(jnp.copy, params), tx.init(params)
    for g in grads:
        got, state = apply(got, state, g)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    np.testing.assert_array_equal(np.asarray(got["i"]), np.arange(3))
    # lax.scan carries the state
    np.testing.assert_array_equal(np.asarray(loop(tx, grads, scan=True)["w"]), np.asarray(want["w"]))
    # apply_if_finite skips a NaN step bitwise, and the run goes on as if it never came
    bad = {"w": grads[2]["w"].at[0, 0].set(jnp.nan), "i": grads[2]["i"]}
    guarded = loop(optax.apply_if_finite(tx, 3), grads[:2] + [bad] + grads[2:])
    np.testing.assert_array_equal(np.asarray(guarded["w"]), np.asarray(want["w"]))
    # MultiSteps(k=2): one step on the mean of each pair of gradients
    pairs = [{"w": ((a["w"].astype(jnp.float32) + b["w"].astype(jnp.float32)) / 2
                    ).astype(jnp.bfloat16), "i": a["i"]} for a, b in zip(grads[::2], grads[1::2])]
    multi = loop(optax.MultiSteps(tx, every_k_schedule=2), grads)
    single = loop(tx, pairs)
    np.testing.assert_array_equal(np.asarray(multi["w"]), np.asarray(single["w"]))


def test_kahan_state_round_trips_exactly_through_orbax(tmp_path):
    params = {"w": jnp.linspace(-1, 1, 300, dtype=jnp.bfloat16), "f": jnp.ones(3)}
    tx = adamx.adam(1e-3, param_rounding="kahan")
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.cos, params), state, params)
        params = optax.apply_updates(params, updates)
    restored = orbax_roundtrip(state, tmp_path)
    assert restored.compensation["f"] is None
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_rounding_modes_need_the_params_and_leave_wider_dtypes_alone():
    params = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(4)}
    tx = adamx.adam(1e-3, param_rounding="stochastic")
    with pytest.raises(ValueError, match=r"adamx.adam: param_rounding='stochastic' needs the params"):
        tx.update(params, tx.init(params))
    updates, _ = tx.update(params, tx.init(params), params)
    nearest, _ = adamx.adam(1e-3).update(params, adamx.adam(1e-3).init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["f"]), np.asarray(nearest["f"]))


# ---- findings of the fuzz pass and the nanoGPT client ---------------------------------------------

def test_two_instances_under_multi_transform_round_on_independent_bits_by_default():
    # A nanoGPT port ran two adamw instances (decayed and not) under optax.multi_transform; with the
    # default seed both rounded leaf k of their partition on the same bits. Bits now follow each
    # leaf's key path, so the two leaves' rounding decisions agree only as often as chance has it.
    n, lr = 100_000, 1e-3
    params = {"a": jnp.full(n, 1.0, jnp.bfloat16), "b": jnp.full(n, 1.0, jnp.bfloat16)}
    tx = optax.multi_transform(
        {"a": adamx.adamw(lr, eps=0.0, param_rounding="stochastic"),
         "b": adamx.adam(lr, eps=0.0, param_rounding="stochastic")}, {"a": "a", "b": "b"})
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    up_a = np.asarray(updates["a"]) != np.asarray(updates["a"]).min()
    up_b = np.asarray(updates["b"]) != np.asarray(updates["b"]).min()
    p = np.mean(up_a)  # both leaves take the same step: the same probability of rounding up
    chance = p * p + (1 - p) * (1 - p)
    assert abs(np.mean(up_a == up_b) - chance) < 5 * np.sqrt(chance * (1 - chance) / n)


def test_kahan_with_params_cast_after_init_names_the_leaf():
    params = {"w": jnp.ones(8)}
    tx = adamx.adam(1e-2, param_rounding="kahan")
    state = tx.init(params)  # float32 params: no compensation
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match=r"adamx.adam: params\['w'\] is bfloat16\[8\], but "
                                         r"state.compensation\['w'\] is None"):
        tx.update(half, state, half)


def test_a_hypergradient_passes_straight_through_stochastic_rounding():
    # d(new param)/d(learning rate): nearest and Kahan pass it through the cast; stochastic
    # rounding does too (a straight-through estimate), and its value is the closed form -sign(g)
    # of the first step, as nearest's is.
    params, grads = jnp.full(4, 1.0, jnp.bfloat16), jnp.array([1.0, -1.0, 2.0, -3.0], jnp.bfloat16)

    def new_param_sum(lr, rounding):
        tx = adamx.adam(lr, eps=0.0, param_rounding=rounding)
        updates, _ = tx.update(grads, tx.init(params), params)
        return jnp.sum(optax.apply_updates(params, updates).astype(jnp.float32) * jnp.arange(4.0))

    want = float(np.sum(-np.sign(np.asarray(grads, np.float32)) * np.arange(4.0)))
    for rounding in ("nearest", "stochastic", "kahan"):
        # to bfloat16's precision: the tangent passes through the params' bfloat16 casts
        assert float(jax.grad(new_param_sum)(jnp.float32(1e-3), rounding)) == pytest.approx(
            want, rel=2**-6)


@pytest.mark.parametrize("seed, message", [(jnp.float32(3.0), r"a traced float32\[\]"),
                                           (jnp.zeros(2, jnp.int32), r"a traced int32\[2\]")])
def test_a_traced_seed_must_be_an_integer_scalar(seed, message):
    params = jnp.ones(4, jnp.bfloat16)

    def step(seed):
        return adamx.update(params, adamx.init(params), params, learning_rate=0.1,
                            param_rounding="stochastic", seed=seed)

    with pytest.raises(TypeError, match=f"adamx.update: seed must be an integer scalar, got {message}"):
        jax.jit(step)(seed)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_param_below_the_overflow_threshold_never_rounds_to_infinity(rounding, dtype):
    # The first step moves -max by -lr, to an exact value above the largest finite magnitude but
    # below the overflow threshold (max + half a gap): its neighbours are -max and -inf, and
    # rounding to nearest gives -max. No rounding mode may give -inf there.
    finfo = jnp.finfo(dtype)
    top_gap = float(finfo.max) - float(np.nextafter(np.asarray(finfo.max, dtype),
                                                     np.asarray(0, dtype)))
    lr = 0.4 * top_gap
    assert float(finfo.max) + lr < float(finfo.max) + top_gap / 2  # below the threshold
    _, new = first_step(jnp.full(4096, -finfo.max, dtype), lr, rounding=rounding)
    np.testing.assert_array_equal(np.asarray(new, np.float64), -float(finfo.max))


def test_kahan_refuses_a_compensation_of_another_16_bit_dtype():
    # A float16 compensation cannot hold a bfloat16 param's rounding error (it overflows).
    half, brain = {"w": jnp.full(2, 1e4, jnp.float16)}, {"w": jnp.full(2, 1e8, jnp.bfloat16)}
    tx = adamx.adam(1e-2, param_rounding="kahan")
    state = tx.init({"w": jnp.ones(2, jnp.float16)})
    with pytest.raises(ValueError, match=r"adamx.adam: params\['w'\] is bfloat16\[2\], but "
                                         r"state.compensation\['w'\] is float16\[2\]"):
        tx.update(brain, state, brain)
    tx.update(half, state, half)  # its own dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_a_single_leaf_params_tree_takes_the_state_its_init_builds(dtype):
    # One leaf that keeps no compensation (float32, int) or no moment (int) makes the whole
    # field None; the transformation must still take its own state, and run as the reference.
    params = jnp.arange(1.0, 9.0).astype(dtype)
    grads = jnp.linspace(-1.0, 1.0, 8).astype(dtype)
    for tx in (adamx.adam(0.1, param_rounding="kahan"), adamx.amsgrad(0.1)):
        updates, _ = tx.update(grads, tx.init(params), params)
        if jnp.issubdtype(dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(updates), 0)
        else:  # the first step is -lr sign(g) up to eps, and to a param's ulp in bfloat16
            np.testing.assert_allclose(np.asarray(updates, np.float64),
                                       -0.1 * np.sign(np.asarray(grads, np.float64)), rtol=1e-6,
                                       atol=0 if dtype == jnp.float32 else 2.0**-4)
