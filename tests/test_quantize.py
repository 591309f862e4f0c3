"""Block-wise dynamic 8-bit moments: the code, its error bounds, edge values, and the state's life.

The oracle for the code is a NumPy decoder written here from the paper's bit layout (sign bit,
a run of zero bits for the decade, an indicator bit, linear fraction bits), and a brute-force
nearest-value encoder over it; neither shares code with ``adamx._quantize``.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _quantize
from tests.reference import ReferenceAdam

BLOCK = 256


def reference_code(signed):
    """Decodes all 256 bit patterns of the dynamic tree code (float64, sorted)."""
    values = []
    for pattern in range(256):
        bits = format(pattern, "08b")
        negative, rest = (bits[0] == "1", bits[1:]) if signed else (False, bits)
        zeros = len(rest) - len(rest.lstrip("0"))
        fraction = rest[zeros + 1:]
        if zeros == len(rest):
            # signed: +0 is zero and -0 is the spare pattern that holds 1.0; unsigned: zero
            values.append(1.0 if negative else 0.0)
        elif not signed and zeros == len(rest) - 1:
            values.append(1.0)  # unsigned: the lone value of the smallest decade holds 1.0
        else:
            bins = 2 ** len(fraction)
            k = int(fraction, 2) if fraction else 0
            magnitude = 10.0 ** -zeros * (0.1 + 0.9 * (k + 0.5) / bins)
            values.append(-magnitude if negative else magnitude)
    return np.sort(np.array(values))


def reference_roundtrip(x, signed, block=BLOCK):
    """Nearest-code encode and decode in float64, block by block, by brute force."""
    table = reference_code(signed)
    flat = np.asarray(x, np.float64).reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        chunk = flat[start:start + block]
        absmax = np.max(np.abs(chunk))
        scaled = chunk / absmax if absmax > 0 else chunk
        distance = np.abs(scaled[:, None] - table[None, :])
        if not signed:
            distance[:, 0] = np.where(scaled > 0, np.inf, distance[:, 0])  # no zero point
        nearest = table[np.argmin(distance, axis=1)]
        out[start:start + block] = nearest * absmax
    return out.reshape(np.shape(x))


def local_half_gap(scaled, signed):
    """Half the gap between the two codes around each scaled value: the rounding error bound."""
    table = reference_code(signed)
    upper = np.clip(np.searchsorted(table, scaled), 1, table.size - 1)
    gap = table[upper] - table[upper - 1]
    below = scaled < table[0]  # only -1 <= x < -0.993 in the signed code
    bound = np.where(below, table[0] - scaled, gap / 2)
    if not signed:  # a positive value below the smallest positive code is rounded up to it
        bound = np.where((scaled > 0) & (scaled < table[1]), table[1] - scaled, bound)
    return bound


def roundtrip(x, signed, block=BLOCK):
    return np.asarray(_quantize.dequantize(_quantize.quantize(jnp.asarray(x), block_size=block,
                                                              signed=signed)), np.float64)


def sample(shape, seed=0):
    """Values over many decades and both signs, in blocks of very different scales."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 0, size=shape)
    return (x * 10.0 ** rng.integers(-20, 20, size=(x.size // BLOCK + 1,)).repeat(BLOCK)[: x.size]
            .reshape(shape)).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_code_tables_are_the_dynamic_tree_code(signed):
    table = _quantize.SIGNED_CODE if signed else _quantize.UNSIGNED_CODE
    assert table.dtype == np.float32 and table.shape == (256,)
    np.testing.assert_array_equal(table, reference_code(signed).astype(np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_is_the_nearest_code_per_block(signed):
    x = sample((300, 257))
    if not signed:
        x = np.abs(x)
    got, want = roundtrip(x, signed), reference_roundtrip(x, signed)
    absmax = np.abs(x.reshape(-1)).reshape(-1)
    absmax = np.repeat(np.maximum.reduceat(absmax, np.arange(0, x.size, BLOCK)), BLOCK)[: x.size]
    absmax = absmax.reshape(x.shape)
    # float32 scaling may pick the other code only at a float32-rounding distance from a tie
    err_got, err_want = np.abs(got - x), np.abs(want - x)
    assert np.all(err_got <= err_want + 1e-6 * absmax)
    assert np.mean(np.isclose(got, want, rtol=1e-6, atol=0)) > 0.999  # the same code
    # slack: float32 rounding of the table value and of the product with absmax
    bound = local_half_gap(x / absmax, signed) * absmax + 1e-6 * (np.abs(x) + np.abs(got)) + 1e-45
    assert np.all(err_got <= bound)


@pytest.mark.parametrize("signed", [True, False])
def test_per_block_error_is_at_most_half_the_top_gap_of_absmax(signed):
    x = sample((64, BLOCK), seed=3)
    x = x if signed else np.abs(x)
    absmax = np.max(np.abs(x), axis=1, keepdims=True)
    # the widest gap is the top decade's: 0.9 / 64 (signed) or 0.9 / 128 (unsigned)
    bound = 0.9 / (64 if signed else 128) / 2
    assert np.all(np.abs(roundtrip(x, signed) - x) <= bound * absmax * (1 + 1e-5))


@pytest.mark.parametrize("signed", [True, False])
def test_zero_and_denormal_blocks_decode_to_zero_without_nan(signed):
    tiny = np.finfo(np.float32).tiny
    x = np.concatenate([np.zeros(BLOCK), np.full(BLOCK, tiny / 4), np.full(BLOCK, tiny / 1000),
                        [tiny / 2, 0.0] * (BLOCK // 2)]).astype(np.float32)
    got = roundtrip(x, signed)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - x) <= tiny)


def test_denormals_beside_a_normal_value_round_to_zero():
    x = np.full(BLOCK, np.finfo(np.float32).tiny / 8, np.float32)
    x[0] = 1.0
    got = roundtrip(x, True)
    assert got[0] == 1.0 and np.all(got[1:] == 0.0)


@pytest.mark.parametrize("value", [3.0, 1e-30, 1e30, -2.5])
def test_all_equal_blocks(value):
    x = np.full(3 * BLOCK, value, np.float32)
    got = roundtrip(x, True)
    if value > 0:
        np.testing.assert_array_equal(got, x)  # the block's max is stored exactly
    else:
        np.testing.assert_allclose(got, x, rtol=0.0071)  # the signed code's most negative is -0.993
    np.testing.assert_array_equal(roundtrip(np.abs(x), False), np.abs(x))


def test_unsigned_code_never_rounds_a_positive_value_to_zero():
    x = np.array([1.0, 1e-9, 1e-12, 0.0, 1e-7] + [0.5] * (BLOCK - 5), np.float32)
    got = roundtrip(x, False)
    smallest = reference_code(False)[1]
    np.testing.assert_allclose(got[[1, 2, 4]], smallest, rtol=1e-6)
    assert got[3] == 0.0


def test_one_huge_value_costs_only_its_own_block():
    x = sample((4 * BLOCK,), seed=5)
    huge = x.copy()
    huge[BLOCK + 7] = 1e30
    got, clean = roundtrip(huge, True), roundtrip(x, True)
    assert got[BLOCK + 7] == np.float32(1e30)
    others = np.r_[0:BLOCK, 2 * BLOCK:4 * BLOCK]
    np.testing.assert_array_equal(got[others], clean[others])
    # the rest of its block is small beside 1e30: it rounds to zero or within the code's bound
    rest = np.r_[BLOCK:BLOCK + 7, BLOCK + 8:2 * BLOCK]
    assert np.all(np.abs(got[rest] - x[rest]) <= np.abs(x[rest]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("signed", [True, False])
def test_non_finite_value_turns_only_its_own_block_nan(bad, signed):
    x = np.abs(sample((5 * BLOCK - 3,), seed=7)) if not signed else sample((5 * BLOCK - 3,), seed=7)
    poisoned = x.copy()
    poisoned[2 * BLOCK + 11] = bad
    got, clean = roundtrip(poisoned, signed), roundtrip(x, signed)
    assert np.all(np.isnan(got[2 * BLOCK:3 * BLOCK]))
    others = np.r_[0:2 * BLOCK, 3 * BLOCK:x.size]
    np.testing.assert_array_equal(got[others], clean[others])


@pytest.mark.parametrize("shape", [(5000,), (3, 7, 301), (64, 64)])
def test_layout_codes_have_the_leaf_shape_and_one_scale_per_block(shape):
    q = _quantize.quantize(jnp.asarray(sample(shape)), block_size=BLOCK)
    size = int(np.prod(shape))
    assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == (-(-size // BLOCK),) and q.absmax.dtype == jnp.float32


@pytest.mark.parametrize("block", [64, 2048])
def test_block_size_is_configurable(block):
    x = sample((4096 + 5,), seed=9)
    err_got = np.abs(roundtrip(x, True, block=block) - x)
    err_want = np.abs(reference_roundtrip(x, True, block=block) - x)
    assert np.all(err_got <= err_want + 1e-6 * np.max(np.abs(x)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_low_precision_inputs_roundtrip_through_float32(dtype):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=2 * BLOCK) * 10.0 ** rng.uniform(-3, 2, 2 * BLOCK), dtype)
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    got = np.asarray(_quantize.dequantize(_quantize.quantize(x)), np.float64)
    err_want = np.abs(reference_roundtrip(x32, True) - x32)
    assert np.all(np.abs(got - x32) <= err_want + 1e-6 * np.max(np.abs(x32)))


def test_int8_moments_rejects_bad_block_sizes():
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        _quantize.int8_moments(block_size=0)
    with pytest.raises(ValueError, match="min_size must be a non-negative integer"):
        _quantize.int8_moments(min_size=-1)


# ---- the quantized state in training --------------------------------------------------------

LR = 1e-2
VARIANTS = {
    "adam": (adamx.adam, {}, {}),
    "adamw": (adamx.adamw, {"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "amsgrad": (adamx.amsgrad, {}, {"amsgrad": "raw"}),
    "nadam": (adamx.nadam, {}, {"nesterov": True}),
    "eps_hat": (adamx.adam, {"eps_hat": True}, {"eps_hat": True}),
}


class QuantizedReference(ReferenceAdam):
    """The float64 oracle, with each big leaf's moments passed through the NumPy code after a step.

    This is the 8-bit scheme: a step decodes the stored moments, updates them and computes its
    update in full precision, then stores them encoded.
    """

    def __init__(self, params, **options):
        super().__init__([(np.shape(p), False) for p in params], lr=LR, **options)
        self.big = [np.size(p) >= 4096 for p in params]

    def step(self, grads, params):
        out = super().step(grads, params)
        for i in np.flatnonzero(self.big):
            self.m[i] = reference_roundtrip(self.m[i], True)
            self.v[i] = reference_roundtrip(self.v[i], False)
            self.v_max[i] = reference_roundtrip(self.v_max[i], False)
        return out


def problem(dtype=jnp.float32, steps=8, seed=0):
    """A quantized leaf (72 x 64, 18 blocks) beside a small float32 one, and gradients."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(72, 64)), dtype),
              "b": jnp.asarray(rng.normal(size=(64,)), dtype)}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 0, v.shape), dtype)
              for k, v in params.items()} for _ in range(steps)]
    return params, grads


def assert_updates_match(got, want, dtype):
    """Per-step updates agree up to the param dtype's rounding and, rarely, one code apart.

    adamx encodes float32 moments, the oracle float64 ones: an element within float32 rounding
    of a midpoint between two codes may take the other code, which moves that element's later
    updates by a fraction of one step; such elements must stay rare.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rtol = max(float(jnp.finfo(dtype).eps), 1e-5)
    close = np.abs(got - want) <= rtol * np.abs(want) + 1e-4 * LR
    assert np.mean(close) > 0.998, np.mean(close)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.5 * LR)


def run_int8(tx, params, grads):
    step = jax.jit(tx.update)
    state = tx.init(params)
    history = []
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return history, state


def run_oracle(params, grads, **options):
    opt = QuantizedReference(list(params.values()), **options)
    history = []
    for g in grads:
        updates = opt.step([np.asarray(g[k], np.float64) for k in params],
                           [np.asarray(x, np.float64) for x in params.values()])
        params = {k: np.asarray(v, np.float64) + u for (k, v), u in zip(params.items(), updates)}
        history.append(dict(zip(params, updates)))
    return history


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_int8_variants_match_the_oracle_with_quantized_moments(variant):
    factory, kwargs, options = VARIANTS[variant]
    params, grads = problem()
    tx = factory(LR, mu_dtype="int8", nu_dtype="int8", **kwargs)
    got, state = run_int8(tx, params, grads)
    assert isinstance(state.mu["w"], _quantize.Quantized) and state.mu["b"].dtype == jnp.float32
    want = run_oracle(params, grads, **options)
    for g, w in zip(got, want):
        for k in params:
            assert_updates_match(g[k], w[k], jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_int8_moments_with_low_precision_params_match_the_oracle(dtype):
    params, grads = problem(dtype)
    got, state = run_int8(adamx.adam(LR, mu_dtype="int8", nu_dtype="int8"), params, grads)
    assert all(u["w"].dtype == dtype for u in got)
    # the moments are kept in float32 or 8 bits whatever the param dtype
    assert state.mu["w"].absmax.dtype == jnp.float32 and state.nu["b"].dtype == jnp.float32
    for g, w in zip(got, run_oracle(params, grads)):
        for k in params:
            assert_updates_match(g[k], w[k], dtype)


def test_int8_float64_params_in_an_x64_process():
    code = (
        "import jax, jax.numpy as jnp, numpy as np, adamx\n"
        "from adamx import _quantize\n"
        "from tests.test_quantize import problem, run_int8, run_oracle, assert_updates_match\n"
        "params, grads = problem(jnp.float64)\n"
        "got, state = run_int8(adamx.adam(1e-2, mu_dtype='int8', nu_dtype='int8'), params, grads)\n"
        "assert isinstance(state.nu['w'], _quantize.Quantized)\n"
        "assert got[0]['w'].dtype == jnp.float64 and state.mu['b'].dtype == jnp.float32\n"
        "for g, w in zip(got, run_oracle(params, grads)):\n"
        "    for k in params: assert_updates_match(g[k], w[k], jnp.float32)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


SHARDED_RUN = """
import jax, jax.numpy as jnp, numpy as np, adamx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from tests.test_quantize import problem
params, grads = problem(steps=2)
params["odd"] = jnp.ones((5000, 3))  # 15,000 elements: blocks straddle the shards
grads = [dict(g, odd=jnp.full((5000, 3), 0.1 * i)) for i, g in enumerate(grads)]
tx = adamx.adam(1e-2, mu_dtype="int8", nu_dtype="int8")
def run(params, grads):
    state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
    return updates, state
want = run(params, grads)
for kind in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(kind,))
    place = lambda t: {k: jax.device_put(v, NamedSharding(mesh, P("d") if v.ndim == 2 else P()))
                       for k, v in t.items()}
    with jax.set_mesh(mesh):
        got = run(place(params), [place(g) for g in grads])
    if kind == AxisType.Explicit:  # under Auto the compiler may choose another placement
        assert got[1].mu["w"].codes.sharding.spec == P("d", None), got[1].mu["w"].codes.sharding
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
"""


def test_int8_state_follows_param_shardings_and_equals_the_single_device_run():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_RUN], cwd=root, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_int8_state_carries_through_scan_and_matches_the_oracle():
    params, grads = problem()
    tx = adamx.adam(LR, mu_dtype="int8", nu_dtype="int8")
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)

    def body(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), updates

    (_, state), updates = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), stacked))(params)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    for i, w in enumerate(run_oracle(params, grads)):
        for k in params:
            assert_updates_match(updates[k][i], w[k], jnp.float32)


def test_int8_state_carries_through_cond_unchanged_when_skipped():
    params, grads = problem(steps=2)
    tx = adamx.adam(LR, mu_dtype="int8", nu_dtype="int8")
    state = jax.jit(tx.update)(grads[0], tx.init(params))[1]

    @jax.jit
    def maybe_step(take, state, g):
        return jax.lax.cond(take, lambda s: tx.update(g, s)[1], lambda s: s, state)

    skipped = maybe_step(False, state, grads[1])
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    taken = maybe_step(True, state, grads[1])
    want = QuantizedReference(list(params.values()))
    for g in grads:
        want.step([np.asarray(g[k], np.float64) for k in params],
                  [np.asarray(x, np.float64) for x in params.values()])
    np.testing.assert_allclose(_quantize.dequantize(taken.mu["w"]), want.m[0], rtol=0,
                               atol=0.02 * np.max(np.abs(want.m[0])))


def test_int8_state_works_under_multisteps_as_adam_on_mean_gradients():
    params, grads = problem(steps=8)
    tx = optax.MultiSteps(adamx.adam(LR, mu_dtype="int8", nu_dtype="int8"), every_k_schedule=2)
    got, _ = run_int8(tx, params, grads)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
             for i in range(0, len(grads), 2)]
    for g, w in zip(got[1::2], run_oracle(params, means)):
        for k in params:
            assert_updates_match(g[k], w[k], jnp.float32)
    assert all(np.all(np.asarray(u["w"]) == 0) for u in got[0::2])  # accumulating steps


def test_int8_state_roundtrips_through_orbax_and_trains_on_identically(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is an optional extra")
    params, grads = problem(steps=6)
    tx = adamx.adamw(LR, mu_dtype="int8", nu_dtype="int8")
    step = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads[:3]:
        state = step(g, state, params)[1]
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored.mu["w"], _quantize.Quantized)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for g in grads[3:]:
        u_a, state = step(g, state, params)
        u_b, restored = step(g, restored, params)
        np.testing.assert_array_equal(u_a["w"], u_b["w"])
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_apply_if_finite_skips_a_nan_step_and_keeps_the_int8_state():
    params, grads = problem(steps=2)
    tx = optax.apply_if_finite(adamx.adam(LR, mu_dtype="int8", nu_dtype="int8"), 3)
    step = jax.jit(tx.update)
    state = step(grads[0], tx.init(params))[1]
    bad = {"w": grads[1]["w"].at[5, 5].set(jnp.nan), "b": grads[1]["b"]}
    updates, after = step(bad, state)
    assert np.all(np.asarray(updates["w"]) == 0)
    for a, b in zip(jax.tree.leaves(after.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(a, b)


def test_without_apply_if_finite_a_nan_gradient_stays_in_its_block():
    params, grads = problem(steps=1)
    tx = adamx.adam(LR, mu_dtype="int8", nu_dtype="int8")
    clean = {"w": grads[0]["w"].at[5, 5].set(0.0), "b": grads[0]["b"]}
    bad = {"w": grads[0]["w"].at[5, 5].set(jnp.nan), "b": grads[0]["b"]}
    step = jax.jit(tx.update)
    _, clean_state = step(clean, tx.init(params))
    _, bad_state = step(bad, tx.init(params))
    block = (5 * 64 + 5) // BLOCK  # the element's row-major block
    for moment in ("mu", "nu"):
        got = np.asarray(_quantize.dequantize(getattr(bad_state, moment)["w"])).reshape(-1)
        want = np.asarray(_quantize.dequantize(getattr(clean_state, moment)["w"])).reshape(-1)
        inside = np.zeros(got.size, bool)
        inside[block * BLOCK:(block + 1) * BLOCK] = True
        assert np.all(np.isnan(got[inside]))
        np.testing.assert_array_equal(got[~inside], want[~inside])
        np.testing.assert_array_equal(getattr(bad_state, moment)["b"], getattr(clean_state, moment)["b"])


def test_unknown_moment_dtypes_are_rejected_with_the_accepted_ones():
    with pytest.raises(ValueError, match='mu_dtype must be one of None, a float dtype, or "int8", '
                                         'got "int4"'):
        adamx.adam(1e-3, mu_dtype="int4")
    with pytest.raises(ValueError, match="nu_dtype must be one of"):
        adamx.init({"w": jnp.ones(3)}, nu_dtype=jnp.int32)


def test_int8_first_moment_of_complex_params_is_rejected_clearly():
    with pytest.raises(TypeError, match="int8 first moment needs real params"):
        adamx.init({"z": jnp.ones(5000, jnp.complex64)}, mu_dtype="int8")


def test_block_size_and_min_size_come_from_int8_moments():
    spec = _quantize.int8_moments(block_size=128, min_size=100)
    state = adamx.init({"w": jnp.ones((10, 30)), "s": jnp.ones(99)}, mu_dtype=spec, nu_dtype="int8")
    assert state.mu["w"].block_size == 128 and state.mu["w"].absmax.shape == (3,)
    assert state.mu["s"].dtype == jnp.float32 and state.nu["w"].dtype == jnp.float32
