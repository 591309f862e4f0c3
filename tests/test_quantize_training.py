"""Quantized moments in training: the float64 oracle with NumPy-quantized moments (see
``tests/quantized_training.py``), edge gradients, and the state's life (scan, cond, MultiSteps,
apply_if_finite, flax.serialization, orbax, export)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests import helpers
from tests.quantized_training import LR, assert_updates_match, problem, run, run_oracle

SPECS = ["int8", "int4"]


VARIANTS = {
    "adam": (adamx.adam, {}, {}),
    "adamw": (adamx.adamw, {"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "amsgrad": (adamx.amsgrad, {}, {"amsgrad": "raw"}),
    "nadam": (adamx.nadam, {}, {"nesterov": True}),
    "eps_hat": (adamx.adam, {"eps_hat": True}, {"eps_hat": True}),
}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_the_oracle_with_quantized_moments(spec, variant):
    factory, kwargs, options = VARIANTS[variant]
    params, grads = problem()
    got, state = run(factory(LR, mu_dtype=spec, nu_dtype=spec, **kwargs), params, grads)
    assert adamx._formats.is_quantized(state.mu["w"]) and state.mu["b"].dtype == jnp.float32
    assert_updates_match(got, run_oracle(params, grads, spec, **options), jnp.float32)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_quantized_moments_with_low_precision_params_match_the_oracle(spec, dtype):
    params, grads = problem(dtype)
    got, state = run(adamx.adam(LR, mu_dtype=spec, nu_dtype=spec), params, grads)
    assert all(u["w"].dtype == dtype for u in got) and state.nu["b"].dtype == jnp.float32
    assert_updates_match(got, run_oracle(params, grads, spec), dtype)


def test_quantized_moments_with_float64_params_in_an_x64_process():
    code = (
        "import jax.numpy as jnp, adamx\n"
        "from tests.quantized_training import problem, run, run_oracle, assert_updates_match\n"
        "params, grads = problem(jnp.float64)\n"
        "for spec in ('int8', 'int4'):\n"
        "    got, state = run(adamx.adam(1e-2, mu_dtype=spec, nu_dtype=spec), params, grads)\n"
        "    assert got[0]['w'].dtype == jnp.float64 and state.mu['b'].dtype == jnp.float32\n"
        "    assert_updates_match(got, run_oracle(params, grads, spec), jnp.float32)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- edge gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_a_finite_gradient_whose_square_overflows_turns_nothing_nan(spec):
    params, grads = problem(steps=3)
    huge = [dict(g) for g in grads]
    huge[0]["w"] = grads[0]["w"].at[5, 7].set(1e20)  # 1e40 overflows float32
    f32_history, _ = run(adamx.adam(LR), params, huge)
    got, state = run(adamx.adam(LR, mu_dtype=spec, nu_dtype=spec), params, huge)
    block = np.zeros((72, 64), bool)
    block.reshape(-1)[256:512] = True  # its 8-bit block
    block[5, 7] = False
    for step, (u, f) in enumerate(zip(got, f32_history)):
        assert np.all(np.isfinite(u["w"])) and np.all(np.isfinite(u["b"]))
        # that element does not move, as with float32 moments (where its v is inf forever)
        assert u["w"][5, 7] == 0 and f["w"][5, 7] == 0
        # Adam's bound on a step, |m_hat / sqrt(v_hat)| <= (1 - b1) / sqrt(1 - b2)
        assert np.all(np.abs(u["w"]) <= np.sqrt(1 / (1 - 0.999)) * (1 - 0.9) * LR * 1.01)
        if spec == "int8" and step > 0:
            # its 8-bit block's second moments decode to at least 2**-16 of the float32 maximum:
            # their steps stop until it decays (under rank-1, its row and column keep their scale)
            assert np.all(np.abs(u["w"])[block] < 1e-12)
    assert np.all(np.isfinite(adamx.dequantize_state(state).nu["w"]))


@pytest.mark.parametrize("spec", SPECS)
def test_a_nan_gradient_stays_in_its_block(spec):
    params, grads = problem(steps=1)
    tx = adamx.adam(LR, mu_dtype=spec, nu_dtype=spec)
    clean = {"w": grads[0]["w"].at[5, 5].set(0.0), "b": grads[0]["b"]}
    bad = {"w": grads[0]["w"].at[5, 5].set(jnp.nan), "b": grads[0]["b"]}
    step = jax.jit(tx.update)
    clean_state = adamx.dequantize_state(step(clean, tx.init(params))[1])
    bad_state = adamx.dequantize_state(step(bad, tx.init(params))[1])
    width = 256 if spec == "int8" else 32
    for moment in ("mu", "nu"):
        got = np.asarray(getattr(bad_state, moment)["w"])
        want = np.asarray(getattr(clean_state, moment)["w"])
        inside = np.zeros(got.shape, bool)
        start = (5 * 64 + 5) // width * width
        inside.reshape(-1)[start:start + width] = True
        if spec == "int4" and moment == "nu":
            inside[:] = False
            inside[5, :], inside[:, 5] = True, True  # rank-1: its row and its column
        assert np.all(np.isnan(got[inside]))
        np.testing.assert_array_equal(got[~inside], want[~inside])
        np.testing.assert_array_equal(getattr(bad_state, moment)["b"],
                                      getattr(clean_state, moment)["b"])


@pytest.mark.parametrize("spec", SPECS)
def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state(spec):
    params, grads = problem(steps=2)
    tx = optax.apply_if_finite(adamx.adam(LR, mu_dtype=spec, nu_dtype=spec), 3)
    step = jax.jit(tx.update)
    state = step(grads[0], tx.init(params))[1]
    bad = {"w": grads[1]["w"].at[5, 5].set(jnp.nan), "b": grads[1]["b"]}
    updates, after = step(bad, state)
    assert np.all(np.asarray(updates["w"]) == 0)
    for a, b in zip(jax.tree.leaves(after.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(a, b)


# ---- the state's life ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_the_state_carries_through_scan_and_matches_the_oracle(spec):
    params, grads = problem()
    tx = adamx.adam(LR, mu_dtype=spec, nu_dtype=spec)
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)

    def body(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), updates

    (_, state), updates = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), stacked))(params)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    got = [jax.tree.map(lambda u, i=i: u[i], updates) for i in range(len(grads))]
    assert_updates_match(got, run_oracle(params, grads, spec), jnp.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_the_state_carries_through_cond_unchanged_when_skipped(spec):
    params, grads = problem(steps=2)
    tx = adamx.adam(LR, mu_dtype=spec, nu_dtype=spec)
    state = jax.jit(tx.update)(grads[0], tx.init(params))[1]

    @jax.jit
    def maybe_step(take, state, g):
        return jax.lax.cond(take, lambda s: tx.update(g, s)[1], lambda s: s, state)

    for a, b in zip(jax.tree.leaves(maybe_step(False, state, grads[1])), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    taken = maybe_step(True, state, grads[1])
    for a, b in zip(jax.tree.leaves(taken), jax.tree.leaves(jax.jit(tx.update)(grads[1], state)[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", SPECS)
def test_multisteps_runs_adam_on_mean_gradients(spec):
    params, grads = problem(steps=8)
    tx = optax.MultiSteps(adamx.adam(LR, mu_dtype=spec, nu_dtype=spec), every_k_schedule=2)
    got, _ = run(tx, params, grads)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
             for i in range(0, len(grads), 2)]
    assert_updates_match(got[1::2], run_oracle(params, means, spec), jnp.float32)
    assert all(np.all(np.asarray(u["w"]) == 0) for u in got[0::2])  # accumulating steps


def trained_state(spec, steps=3):
    params, grads = problem(steps=steps + 3)
    tx = adamx.adamw(LR, mu_dtype=spec, nu_dtype=spec)
    step = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads[:steps]:
        state = step(g, state, params)[1]
    return tx, step, params, grads[steps:], state


def assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def assert_trains_on_identically(step, params, grads, a, b, other_step=None):
    """From states ``a`` and ``b``, ``step`` (and ``other_step`` for ``b``) give the same updates
    and states, bit for bit."""
    for g in grads:
        u_a, a = step(g, a, params)
        u_b, b = (other_step or step)(g, b, params)
        np.testing.assert_array_equal(u_a["w"], u_b["w"])
    assert_same_state(a, b)


@pytest.mark.parametrize("spec", SPECS)
def test_the_state_roundtrips_through_flax_serialization(spec):
    from flax import serialization
    tx, step, params, rest, state = trained_state(spec)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert_same_state(restored, state)
    as_dict = serialization.to_state_dict(state)
    assert set(as_dict["mu"]["w"]) == set(type(state.mu["w"])._fields)
    assert_same_state(serialization.from_state_dict(tx.init(params), as_dict), state)
    assert_trains_on_identically(step, params, rest, state, restored)


@pytest.mark.parametrize("spec", SPECS)
def test_the_state_roundtrips_through_orbax(spec, tmp_path):
    tx, step, params, rest, state = trained_state(spec)
    restored = helpers.orbax_roundtrip(state, tmp_path)
    assert type(restored.nu["w"]) is type(state.nu["w"])
    assert_same_state(restored, state)
    assert_trains_on_identically(step, params, rest, state, restored)


@pytest.mark.parametrize("spec", SPECS)
def test_a_step_exports_serializes_and_runs_identically(spec):
    tx, step, params, rest, state = trained_state(spec)
    exported = jax.export.export(jax.jit(tx.update))(rest[0], state, params)
    again = jax.export.deserialize(exported.serialize())
    assert_trains_on_identically(again.call, params, rest, state, state, other_step=step)


@pytest.mark.parametrize("spec", SPECS)
def test_dequantize_state_decodes_every_quantized_moment(spec):
    tx, _, params, _, state = trained_state(spec)
    decoded = adamx.dequantize_state(state)
    for field in ("mu", "nu"):
        moment = getattr(state, field)
        assert getattr(decoded, field)["w"].dtype == jnp.float32
        assert getattr(decoded, field)["w"].shape == (72, 64)
        np.testing.assert_array_equal(getattr(decoded, field)["w"], adamx.dequantize(moment["w"]))
        np.testing.assert_array_equal(getattr(decoded, field)["b"], moment["b"])
    assert decoded.count == state.count
    # optax's tree utilities read a quantized state's raw codes and scales; decoded, the moments
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(
        [adamx.dequantize(state.mu["w"]), state.mu["b"]])))
    np.testing.assert_allclose(float(optax.tree.norm(decoded.mu)), want, rtol=1e-5)
    assert not np.isclose(float(optax.tree.norm(state.mu)), want, rtol=0.1)  # codes, not moments
