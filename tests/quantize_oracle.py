"""A NumPy oracle of adamx's quantized moments, written from their documented definitions.

Nothing here imports adamx: the code tables are built from the formulas in ``adamx/_codes.py``'s
docstring (not from its bit manipulations), rounding is a brute-force search over each table in
float64, and the random bits are the documented hash of (seed, count, stream, element index),
a leaf's stream the CRC-32 of its key path.
"""

import zlib

import numpy as np


def log_table(mantissa, top):
    """Magnitudes of an 8-bit log code, by code 0..top: code top is 1, each binade below it holds
    2**mantissa evenly spaced values, code 0 is 0."""
    per = 2**mantissa
    values = [0.0]
    for code in range(1, top + 1):
        d = top - code  # codes below the top
        if d == 0:
            values.append(1.0)
        else:
            exponent, step = -(1 + (d - 1) // per), per - 1 - (d - 1) % per
            values.append(2.0**exponent * (1 + step / per))
    return np.array(values)


SIGNED8 = log_table(3, 127)        # index by |code|, code in [-127, 127]
UNSIGNED8 = log_table(4, 255)      # index by code, code in [0, 255]
SQUARE4 = (np.arange(8) / 7.0)**2  # index by |code|, code in [-7, 7]
LINEAR4 = (np.arange(16) + 1) / 16.0


def signed_values(magnitudes):
    """All values of a sign-magnitude code, sorted, with their codes."""
    codes = np.arange(-(magnitudes.size - 1), magnitudes.size)
    return codes, np.sign(codes) * magnitudes[np.abs(codes)]


def round_to(y, table, u=None, no_zero=False):
    """Each float64 ``y`` rounded to a value of the sorted ``table``: to nearest (u None), or up
    from its lower neighbour lo to hi when ``u >= (hi - y) / (hi - lo)``. Values beyond the table
    clip to its ends; with ``no_zero`` a positive value never becomes 0."""
    y = np.asarray(y, np.float64)
    hi_index = np.clip(np.searchsorted(table, y, side="right"), 1, table.size - 1)
    lo, hi = table[hi_index - 1], table[hi_index]
    if u is None:
        out = np.where(y - lo <= hi - y, lo, hi)
    else:
        out = np.where(u >= (hi - y) / (hi - lo), hi, lo)
    out = np.where(y <= table[0], table[0], np.where(y >= table[-1], table[-1], out))
    if no_zero:
        smallest = table[table > 0].min()
        out = np.where((y > 0) & (out <= 0), smallest, out)
    return out


def bfloat16_up(x):
    """A positive float32 rounded up to the next bfloat16 value (bfloat16 keeps the top 16 bits)."""
    bits = np.asarray(np.float32(x)).view(np.uint32)
    return float(np.uint32((int(bits) + 0xFFFF) & 0xFFFF0000).view(np.float32))


def roundtrip_blocks(x, block, table, u=None, no_zero=False, scale_up=None):
    """Block-wise: each block scaled by its largest magnitude (in float32, or rounded up by
    ``scale_up``), rounded, scaled back.

    ``table``: a code's magnitudes, 0 first. A signed value's magnitude is rounded (so stochastic
    rounding goes away from zero when ``u`` is large) and takes the value's sign.
    """
    flat = np.asarray(x, np.float64).reshape(-1)
    out = np.empty_like(flat)
    uf = None if u is None else np.asarray(u, np.float64).reshape(-1)
    for start in range(0, flat.size, block):
        chunk = flat[start:start + block]
        scale = np.float64(np.float32(np.max(np.abs(chunk))))
        if scale_up is not None and scale > 0:
            scale = scale_up(scale)
        if scale == 0:
            out[start:start + block] = 0.0
            continue
        part = None if uf is None else uf[start:start + block]
        rounded = round_to(np.abs(chunk) / scale, table, part, no_zero)
        out[start:start + block] = np.sign(chunk) * rounded * scale
    return out.reshape(np.shape(x))


def roundtrip_rank1(x, u=None):
    """Rank-1 (rows: all leading axes, columns: the last): element (i, j) scaled by
    min(max of row i, max of column j), rounded in the 4-bit linear code, scaled back."""
    x = np.asarray(x, np.float64)
    m = x.reshape(-1, x.shape[-1])
    rows = np.float32(m.max(axis=1)).astype(np.float64)
    cols = np.float32(m.max(axis=0)).astype(np.float64)
    scale = np.minimum(rows[:, None], cols[None, :])
    safe = np.where(scale > 0, scale, 1.0)
    part = None if u is None else np.asarray(u, np.float64).reshape(m.shape)
    out = np.where(scale > 0, round_to(m / safe, LINEAR4, part) * scale, 0.0)
    return out.reshape(x.shape)


def _mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def random_bits(shape, seed, count, stream):
    """The uint32 random bits of (seed, count, stream, row-major element index): the element's
    index times 0x9E3779B9 plus the key, mixed; the key is the mix of (the mix of the seed xor
    0x9E3779B9) xor the count, plus the mix of the stream."""
    with np.errstate(over="ignore"):
        step = _mix32(_mix32(np.uint32(seed) ^ np.uint32(0x9E3779B9)) ^ np.uint32(count))
        key = step + _mix32(np.uint32(stream))
        index = np.arange(int(np.prod(shape)), dtype=np.uint64).astype(np.uint32).reshape(shape)
        return _mix32(index * np.uint32(0x9E3779B9) + key)


MOMENTS = 0x6A09E667  # a leaf's moments draw from its stream xor this; its param, from the stream


def stream(keystr):
    """A leaf's stream: the CRC-32 of its key path as ``jax.tree_util.keystr`` writes it."""
    return zlib.crc32(keystr.encode())


def moment_uniforms(shape, seed, count, keystr):
    """The uniforms of a leaf's stochastic rounding: (first moment's, second moment's)."""
    bits = random_bits(shape, seed, count, stream(keystr) ^ MOMENTS)
    return (bits & 0xFFFF) / 2.0**16, (bits >> 16) / 2.0**16
