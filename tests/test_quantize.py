"""Quantized moments: every code against a NumPy decoder, rounding, layouts, and edge values.

The oracle is ``tests/quantize_oracle.py``: code tables built from their documented formulas, a
brute-force nearest or stochastic rounding over them in float64, and an independent nibble packing
here; none of it shares code with adamx.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import adamx
from adamx._quantize import Int4Blocks, Int4Rank1, Int8Blocks
from tests import quantize_oracle as oracle

F32_MAX = float(np.finfo(np.float32).max)


def pack_nibbles(codes):
    """Two 4-bit codes per byte along the last axis: element 2j low, 2j + 1 high (NumPy)."""
    codes = np.asarray(codes, np.int64) & 15
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# ---- every code decodes to its documented value ------------------------------------------------

def test_signed_8bit_codes_decode_to_the_log_table():
    codes, want = oracle.signed_values(oracle.SIGNED8)
    got = adamx.dequantize(Int8Blocks(jnp.asarray(codes, jnp.int8), jnp.ones(1)))
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert want[-1] == 1.0 and want[-2] == 1 - 2**-4 and oracle.SIGNED8[1] == 2.0**-16 * 1.25


def test_unsigned_8bit_codes_decode_to_the_log_table():
    codes = np.arange(256)
    got = adamx.dequantize(Int8Blocks(jnp.asarray(codes, jnp.uint8), jnp.ones(1)))
    np.testing.assert_array_equal(got, oracle.UNSIGNED8.astype(np.float32))
    assert oracle.UNSIGNED8[1] == 2.0**-16 * (1 + 2 / 16)  # 16 binades below the block max


def test_signed_4bit_codes_decode_to_squares():
    codes, want = oracle.signed_values(oracle.SQUARE4)  # 15 codes; pad to 16 with a zero
    codes, want = np.append(codes, 0), np.append(want, 0.0)
    q = Int4Blocks(jnp.asarray(pack_nibbles(codes).view(np.int8)), jnp.ones(1, jnp.bfloat16))
    np.testing.assert_array_equal(adamx.dequantize(q), want.astype(np.float32))


def test_unsigned_4bit_codes_decode_to_the_linear_code_without_zero():
    codes = np.arange(16).reshape(2, 8).repeat(2, axis=0)  # 4 rows of 8 columns
    q = Int4Rank1(jnp.asarray(pack_nibbles(codes)), jnp.ones(4), jnp.ones(8))
    np.testing.assert_array_equal(adamx.dequantize(q), oracle.LINEAR4[codes].astype(np.float32))
    assert oracle.LINEAR4.min() == 1 / 16


# ---- rounding ----------------------------------------------------------------------------------

def same_codes(got, want):
    """Whether each decoded value is the oracle's code value (to float32 rounding of the product
    with the scale: a square code is k**2 * float32(1/49) there, k**2 / 49 here)."""
    return np.isclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0)


def sample(shape, seed=0, positive=False):
    """Values over many decades, in blocks of 256 of very different scales."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-5, 0, size=shape)
    scales = 10.0 ** rng.integers(-20, 20, size=math.prod(shape) // 256 + 1).repeat(256)
    x = (x * scales[: x.size].reshape(shape)).astype(np.float32)
    return np.abs(x) if positive else x


CASES = {  # name: (spec, signed, NumPy roundtrip with uniforms u or None)
    "int8 signed": ("int8", True, lambda x, u: oracle.roundtrip_blocks(x, 256, oracle.SIGNED8, u)),
    "int8 unsigned": ("int8", False, lambda x, u: oracle.roundtrip_blocks(
        x, 256, oracle.UNSIGNED8, u, no_zero=True)),
    "int4 signed": ("int4", True, lambda x, u: oracle.roundtrip_blocks(
        x, 32, oracle.SQUARE4, u, scale_up=oracle.bfloat16_up)),
    "int4 rank-1": ("int4", False, lambda x, u: oracle.roundtrip_rank1(x, u)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_to_nearest_is_the_nearest_code(case):
    spec, signed, reference = CASES[case]
    x = sample((96, 256), seed=1, positive=not signed)
    q = adamx.quantize(jnp.asarray(x), spec, signed=signed)
    got, want = np.asarray(adamx.dequantize(q), np.float64), reference(x, None)
    # adamx scales in float32: only values within float32 rounding of a midpoint may differ
    x64 = x.astype(np.float64)
    assert np.all(np.abs(got - x64) <= np.abs(want - x64) * (1 + 1e-6) + 1e-6 * np.abs(x64))
    assert np.mean(same_codes(got, want)) > 0.999


@pytest.mark.parametrize("case", sorted(CASES))
def test_stochastic_rounding_matches_the_oracle_on_the_same_random_bits(case):
    spec, signed, reference = CASES[case]
    x = sample((64, 256), seed=2, positive=not signed)
    bits = oracle.random_bits(x.shape, seed=5, count=3, stream=7)
    u = ((bits & 0xFFFF) if signed else (bits >> 16)) / 2.0**16
    q = adamx.quantize(jnp.asarray(x), spec, signed=signed, random_bits=jnp.asarray(bits))
    got, want = np.asarray(adamx.dequantize(q), np.float64), reference(x, u)
    assert np.mean(same_codes(got, want)) > 0.999


@pytest.mark.parametrize("case", sorted(CASES))
def test_stochastic_rounding_is_unbiased(case):
    spec, signed, _ = CASES[case]
    # one value between two codes, in every element of a 64 x 256 leaf whose first column holds
    # the scale (1.0), drawn 40 times: 655,360 draws of the same rounding
    table = {"int8 signed": oracle.SIGNED8, "int8 unsigned": oracle.UNSIGNED8,
             "int4 signed": oracle.SQUARE4, "int4 rank-1": oracle.LINEAR4}[case]
    lo, hi = table[-4], table[-3]
    value = lo + 0.3 * (hi - lo)
    x = np.full((64, 256), value, np.float32)
    x[:, ::32] = 1.0  # every block (of 32 or 256), row and column holds the scale 1
    x[0, :] = 1.0
    sums, seen = 0.0, set()
    rng = np.random.default_rng(3)
    for _ in range(40):
        bits = jnp.asarray(rng.integers(0, 2**32, size=x.shape, dtype=np.uint64).astype(np.uint32))
        got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), spec, signed=signed,
                                                         random_bits=bits)), np.float64)[x != 1]
        sums += got.sum()
        seen |= set(np.unique(got).tolist())
    n = 40 * int(np.sum(x != 1))
    assert all(np.isclose(s, lo, rtol=1e-6) or np.isclose(s, hi, rtol=1e-6) for s in seen)
    # binomial: the mean's standard deviation is (hi - lo) sqrt(p (1 - p) / n); allow 5 of them
    assert abs(sums / n - np.float32(value)) < 5 * (hi - lo) * math.sqrt(0.21 / n) + 1e-7


# ---- layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, block", [((5000,), 256), ((3, 7, 301), 64), ((64, 64), 256),
                                          ((1000,), 512), ((300,), 1024), ((8,), 2)])
def test_int8_layout_codes_have_the_leaf_shape_and_one_scale_per_block(shape, block):
    q = adamx.quantize(jnp.asarray(sample(shape)), adamx.int8_moments(block))
    size = math.prod(shape)
    assert type(q) is Int8Blocks and q.codes.shape == shape and q.codes.dtype == jnp.int8
    assert q.absmax.shape == (-(-size // block),) and q.absmax.dtype == jnp.float32
    # the block size is recovered from the shapes alone (the decoder is given nothing else)
    x = sample(shape)
    want = oracle.roundtrip_blocks(x, min(block, size), oracle.SIGNED8)
    got = adamx.dequantize(adamx.quantize(jnp.asarray(x), adamx.int8_moments(block)))
    assert np.mean(same_codes(got, want)) > 0.999


def test_int4_layouts_pack_two_codes_per_byte():
    x = jnp.asarray(sample((64, 200)))
    m = adamx.quantize(x, "int4")
    assert type(m) is Int4Blocks and m.codes.shape == (64, 100) and m.codes.dtype == jnp.int8
    assert m.absmax.shape == (64 * 200 // 32,) and m.absmax.dtype == jnp.bfloat16
    v = adamx.quantize(jnp.abs(x), "int4", signed=False)
    assert type(v) is Int4Rank1 and v.codes.shape == (64, 100) and v.codes.dtype == jnp.uint8
    assert v.row_max.shape == (64,) and v.col_max.shape == (200,)
    odd = adamx.quantize(jnp.abs(jnp.asarray(sample((64, 201)))), "int4", signed=False)
    assert odd.codes.shape == (64, 101) and adamx.dequantize(odd).shape == (64, 201)
    # a first moment with an odd last dimension, and a 1-D second moment: 8-bit blocks
    assert type(adamx.quantize(jnp.asarray(sample((64, 201))), "int4")) is Int8Blocks
    assert type(adamx.quantize(jnp.abs(x).reshape(-1), "int4", signed=False)) is Int8Blocks


def test_rank1_rows_and_columns_are_the_leading_axes_and_the_last():
    x = np.abs(sample((4, 16, 64), seed=4))
    v = adamx.quantize(jnp.asarray(x), "int4", signed=False)
    assert v.row_max.shape == (4, 16) and v.col_max.shape == (64,)
    np.testing.assert_array_equal(v.row_max, x.max(axis=2))
    np.testing.assert_array_equal(v.col_max, x.max(axis=(0, 1)))
    assert np.mean(same_codes(adamx.dequantize(v), oracle.roundtrip_rank1(x))) > 0.999


# ---- edge values -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_and_denormal_blocks_decode_to_zero_without_nan(case):
    spec, signed, _ = CASES[case]
    tiny = np.finfo(np.float32).tiny
    x = np.zeros((64, 256), np.float32)
    x[16:32], x[32:48] = tiny / 4, tiny / 1000
    got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), spec, signed=signed)))
    assert np.all(np.isfinite(got)) and np.all(np.abs(got - x) <= tiny)


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_a_positive_second_moment_never_decodes_to_zero(spec):
    x = np.full((64, 256), 1e-30, np.float32)
    x[5, 7] = 1e10  # 40 decades above the rest of its block, its row and its column
    x[9, 9] = 0.0
    for bits in (None, jnp.asarray(oracle.random_bits(x.shape, 1, 2, 3))):
        got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), spec, signed=False,
                                                         random_bits=bits)))
        assert np.all(got[x > 0] > 0)
        # a zero is 0 in the 8-bit code; the 4-bit linear code has no zero: 1/16 of its scale
        assert got[9, 9] == (0.0 if spec == "int8" else np.float32(1e-30 / 16))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_value_turns_only_its_own_block_nan(case, bad):
    spec, signed, _ = CASES[case]
    x = sample((64, 256), seed=6, positive=not signed)
    poisoned = x.copy()
    poisoned[10, 11] = bad if signed or bad != np.inf else np.nan
    got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(poisoned), spec, signed=signed)))
    clean = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), spec, signed=signed)))
    block = np.zeros(x.shape, bool)
    if case == "int4 rank-1":
        block[10, :], block[:, 11] = True, True  # its row and its column
    else:
        width = 256 if spec == "int8" else 32
        flat = block.reshape(-1)
        start = (10 * 256 + 11) // width * width
        flat[start:start + width] = True
    assert np.all(np.isnan(got[block]))
    np.testing.assert_array_equal(got[~block], clean[~block])


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_an_overflowed_second_moment_saturates_at_the_float32_maximum(spec):
    x = sample((64, 256), seed=8, positive=True)
    big = x.copy()
    big[3, 4] = np.inf  # what g**2 gives for a finite g of 1e20
    got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(big), spec, signed=False)))
    clean = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), spec, signed=False)))
    assert np.all(np.isfinite(got)) and got[3, 4] == np.float32(F32_MAX)
    others = np.ones(x.shape, bool)
    if spec == "int8":
        # the rest of its block decodes to the code's floor of that maximum (about 5e33)
        others[3, :] = False
        assert np.min(got[3][np.arange(256) != 4]) >= np.float32(oracle.UNSIGNED8[1] * F32_MAX)
    else:
        # rank-1: its row and column keep the scale of their other maximum, so stay as small
        others[3, :] = others[:, 4] = False
        assert np.all(got[3, :4] <= x[:, :4].max(axis=0) * 1.0001)
        assert np.all(np.delete(got[:, 4], 3) <= np.delete(x.max(axis=1), 3) * 1.0001)
    np.testing.assert_array_equal(got[others], clean[others])


@pytest.mark.parametrize("value", [3.0, 1e-30, 1e30, -2.5])
def test_the_largest_magnitude_of_a_block_is_stored_exactly(value):
    x = np.full((64, 512), value, np.float32)
    for spec in ("int8", "int4"):
        np.testing.assert_array_equal(
            adamx.dequantize(adamx.quantize(jnp.asarray(np.abs(x)), spec, signed=False)), np.abs(x))
    np.testing.assert_array_equal(adamx.dequantize(adamx.quantize(jnp.asarray(x), "int8")), x)
    # 4-bit blocks keep bfloat16 scales, rounded up: the largest magnitude within one bfloat16 ulp
    got = np.asarray(adamx.dequantize(adamx.quantize(jnp.asarray(x), "int4")), np.float64)
    np.testing.assert_array_equal(got, np.sign(value) * oracle.bfloat16_up(abs(value)))
    assert np.all(np.abs(got) >= np.abs(x)) and np.all(np.abs(got) <= np.abs(x) * (1 + 2**-7))


# ---- specs and errors --------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [adamx.int8_moments, adamx.int4_moments, adamx.Int8Spec,
                                     adamx.Int4Spec])
@pytest.mark.parametrize("bad", [2**62, 0, 1, 3, 100, 2**31, True, 2.0, "256"])
def test_specs_reject_block_sizes_that_are_not_powers_of_two_in_range(factory, bad):
    # the spec checks itself, however it is built (block_size=0 once divided by zero at init, and
    # 3 built a state that its own update refused)
    name = "Int4Spec" if factory in (adamx.int4_moments, adamx.Int4Spec) else "Int8Spec"
    with pytest.raises(ValueError, match=rf"adamx\.{name}: block_size must be a power of two in "
                                         rf"\[2, 2\*\*30\], got {bad!r}"):
        factory(block_size=bad)


@pytest.mark.parametrize("factory", [adamx.int8_moments, adamx.int4_moments])
@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, None])
def test_specs_reject_bad_min_sizes(factory, bad):
    with pytest.raises(ValueError, match=rf"min_size must be an integer in \[0, 2\*\*63\), "
                                         rf"got {bad!r}"):
        factory(min_size=bad)


def test_largest_block_size_works_on_a_leaf_smaller_than_it():
    x = jnp.asarray(sample((5000,)))
    q = adamx.quantize(x, adamx.int8_moments(2**30))
    assert q.absmax.shape == (1,)
    want = oracle.roundtrip_blocks(np.asarray(x), 5000, oracle.SIGNED8)
    assert np.mean(same_codes(adamx.dequantize(q), want)) > 0.999


def test_quantize_rejects_what_it_cannot_encode():
    with pytest.raises(ValueError, match='adamx.quantize: spec must be "int8", "int4"'):
        adamx.quantize(jnp.ones(4), "int2")
    with pytest.raises(TypeError, match="x must be a real float array, got dtype int32"):
        adamx.quantize(jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"at least one dimension and one element, got shape \(\)"):
        adamx.quantize(jnp.float32(1.0))
    with pytest.raises(TypeError, match="adamx.dequantize: q must be an Int8Blocks"):
        adamx.dequantize(jnp.ones(4))


def test_a_stored_moment_that_does_not_fit_the_grads_is_refused_by_name():
    state = adamx.init({"w": jnp.zeros((64, 128))}, mu_dtype="int4", nu_dtype="int8")
    grads = {"w": jnp.zeros((64, 128))}
    tx = adamx.adam(1e-3, mu_dtype="int4", nu_dtype="int8")
    bad = state._replace(mu={"w": state.mu["w"]._replace(absmax=jnp.zeros(3, jnp.bfloat16))})
    with pytest.raises(ValueError, match=r"state\.mu\['w'\]\.absmax has shape \(3,\), which is no "
                                         r"number of power-of-two blocks"):
        tx.update(grads, bad)
    bad = state._replace(nu={"w": state.nu["w"]._replace(codes=state.nu["w"].codes.astype(jnp.int32))})
    with pytest.raises(ValueError, match=r"state\.nu\['w'\]\.codes of an Int8Blocks must be int8 or "
                                         r"uint8, got int32"):
        tx.update(grads, bad)
    with pytest.raises(ValueError, match=r"state\.mu\['w'\]\.codes has shape \(64, 64\), but a "
                                         r"grads' leaf of shape \(64, 130\) needs \(64, 65\)"):
        tx.update({"w": jnp.zeros((64, 130))}, state._replace(nu={"w": jnp.zeros((64, 130))}))


def test_unknown_moment_dtypes_are_rejected_with_the_accepted_ones():
    with pytest.raises(ValueError, match='mu_dtype must be one of .*"int8" or "int4", got "int2"'):
        adamx.adam(1e-3, mu_dtype="int2")


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_a_quantized_first_moment_of_complex_params_is_rejected_clearly(spec):
    with pytest.raises(TypeError, match=f"an {spec} first moment needs real params"):
        adamx.init({"z": jnp.ones(5000, jnp.complex64)}, mu_dtype=spec)


def test_block_size_and_min_size_come_from_the_spec():
    state = adamx.init({"w": jnp.ones((10, 30)), "s": jnp.ones(99)},
                       mu_dtype=adamx.int8_moments(block_size=128, min_size=100),
                       nu_dtype=adamx.int4_moments(block_size=64, min_size=100))
    assert state.mu["w"].absmax.shape == (3,) and state.mu["s"].dtype == jnp.float32
    # 10 x 30 is too small for rank-1 scales (rows + columns above 1/32 of its size): 8-bit blocks
    # of the spec's block size
    assert type(state.nu["w"]) is Int8Blocks and state.nu["w"].absmax.shape == (5,)
