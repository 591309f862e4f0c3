"""Block-wise dynamic 8-bit moments: the code, its error bounds, edge values, and the state's life.

The oracle for the code is a NumPy decoder written here from the paper's bit layout (sign bit,
a run of zero bits for the decade, an indicator bit, linear fraction bits), and a brute-force
nearest-value encoder over it; neither shares code with ``adamx._quantize``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamx import _quantize

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
        nearest = table[np.argmin(np.abs(scaled[:, None] - table[None, :]), axis=1)]
        out[start:start + block] = nearest * absmax
    return out.reshape(np.shape(x))


def local_half_gap(scaled, signed):
    """Half the gap between the two codes around each scaled value: the rounding error bound."""
    table = reference_code(signed)
    upper = np.clip(np.searchsorted(table, scaled), 1, table.size - 1)
    gap = table[upper] - table[upper - 1]
    below = scaled < table[0]  # only -1 <= x < -0.993 in the signed code
    return np.where(below, table[0] - scaled, gap / 2)


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
    assert np.all(err_got <= local_half_gap(x / absmax, signed) * absmax * (1 + 1e-5) + 1e-45)


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
