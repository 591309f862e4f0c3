"""The element codes of quantized moments: float32 values scaled to [-1, 1] <-> small integers.

Every code is integer arithmetic on a float32 value's bits, comparisons, and multiplications that
are exact or correctly rounded, so each backend gives the same codes; none needs a table lookup
(a gather, slow on XLA:CPU).

Rounding is to nearest, or stochastic: given 16 uniform random bits per element (``noise``, uint32
values below ``2**16``, read as ``u = noise / 2**16``), a value between neighbouring code values
``lo <= y < hi`` is stored as ``hi`` when ``u >= (hi - y) / (hi - lo)``, so with probability
``(y - lo) / (hi - lo)`` (to within ``2**-16``): the stored value is unbiased (a signed code
rounds the magnitude). Training rounds stochastically: Adam's second moment moves by about
``1 - b2`` a step, far less than half the gap between two codes, so rounded to nearest it would
move only with its block's scale.

The codes:

* ``log`` (8 bits): ``|y|`` with ``m`` mantissa bits: code ``c`` in ``[1, top]`` stands for the
  float32 whose bits are ``bits(1.0) + ((c - top) << (23 - m))``, so ``top`` is exactly 1 and each
  binade below holds ``2**m`` codes; code 0 is 0. The signed code stores ``-c`` for a negative
  value. First moment: signed, ``m = 3``, 127 magnitudes over 16 binades. Second moment: unsigned,
  ``m = 4``, 255 values over 16 binades; a positive value below them is stored as code 1, never 0.
* ``square`` (4 bits, first moment): ``sign * (k / 7)**2`` for ``k`` in ``[0, 7]``, two's complement
  ``[-7, 7]``.
* ``linear`` (4 bits, second moment): Li et al.'s ``(k + 1) / 16`` for ``k`` in ``[0, 15]``. It
  excludes zero, so a positive second moment never decodes to 0.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

_ONE = 0x3F800000  # the float32 bits of 1.0
_UNIT = np.float32(2.0**-16)  # 16 random bits -> [0, 1)


def _uniform(noise):
    return noise.astype(jnp.float32) * _UNIT


def log_smallest(mantissa, top):
    """The smallest nonzero magnitude of a log code (code 1), as a float32."""
    return np.uint32(_ONE + ((1 - top) << (23 - mantissa))).view(np.float32)


def log_encode(y, *, mantissa, top, signed, noise=None, positive=None):
    """Log codes (int32) of ``y``: float32 in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned).

    Within a binade the codes are evenly spaced, so rounding the float32 bits (adding half of the
    dropped part, or ``noise`` scaled to it, and shifting it out) rounds the value, and a carry
    moves it into the next binade. A signed value below the smallest code becomes 0 or code 1
    (stochastically with probability ``|y| / smallest``); an unsigned one becomes code 1.
    ``positive`` (unsigned only): which elements are above 0, if not ``y > 0``; pass it when ``y``
    is a scaled value, as a ratio below 2**-126 flushes to 0 where denormals do.
    """
    shift = 23 - mantissa
    mag = jnp.abs(y) if signed else y
    raw = lax.bitcast_convert_type(mag, jnp.uint32)
    add = np.uint32(1 << (shift - 1)) if noise is None else noise << np.uint32(shift - 16)
    code = ((raw + add) >> np.uint32(shift)).astype(jnp.int32) - ((_ONE >> shift) - top)
    code = jnp.minimum(code, top)
    smallest = log_smallest(mantissa, top)
    if not signed:
        return jnp.where(y > 0 if positive is None else positive, jnp.maximum(code, 1), 0)
    up = mag >= smallest / 2 if noise is None else smallest - mag <= _uniform(noise) * smallest
    code = jnp.where(mag < smallest, up.astype(jnp.int32), code)
    return jnp.where(y < 0, -code, code)


def log_decode(code, *, mantissa, top):
    """The values in ``[-1, 1]`` (float32) of log codes (any integer dtype)."""
    shift = 23 - mantissa
    code = code.astype(jnp.int32)
    size = jnp.abs(code)
    bits = ((size + ((_ONE >> shift) - top)) << shift).astype(jnp.uint32)
    mag = jnp.where(size > 0, lax.bitcast_convert_type(bits, jnp.float32), np.float32(0))
    return jnp.where(code < 0, -mag, mag)


_SQUARES = np.arange(8, dtype=np.float32) ** 2 / np.float32(49)  # (k / 7)**2 in float32


def square_encode(y, *, noise=None):
    """4-bit square codes (int32 in ``[-7, 7]``) of ``y`` in ``[-1, 1]``: ``y ~ sign * (k/7)**2``.

    The lower neighbour is found by comparisons (exact), then rounded up to nearest or
    stochastically, written without a division.
    """
    mag = jnp.abs(y)
    low = sum((mag >= _SQUARES[k]).astype(jnp.int32) for k in range(1, 7))
    lo = (low * low).astype(jnp.float32) * np.float32(1 / 49)
    hi = ((low + 1) * (low + 1)).astype(jnp.float32) * np.float32(1 / 49)
    if noise is None:
        up = mag - lo > hi - mag
    else:
        up = hi - mag <= _uniform(noise) * (hi - lo)
    code = low + up.astype(jnp.int32)
    return jnp.where(y < 0, -code, code)


def square_decode(code):
    """The values ``sign * (k / 7)**2`` (float32) of square codes.

    ``k = 7`` is selected as exactly 1 (so a block's largest magnitude decodes exactly): XLA
    reassociates ``k**2 * (1/49) * scale`` into ``k**2 * (scale / 49)``, and ``49 * (s / 49)`` need
    not be ``s``.
    """
    code = code.astype(jnp.int32)
    size = jnp.abs(code)
    mag = jnp.where(size == 7, np.float32(1), (size * size).astype(jnp.float32) * np.float32(1 / 49))
    return jnp.where(code < 0, -mag, mag)


def linear_encode(y, *, noise=None):
    """4-bit linear codes ``k`` (int32 in ``[0, 15]``) of ``y`` in ``[0, 1]``: ``y ~ (k + 1) / 16``.

    Values below 1/16 are stored as ``k = 0``: the code has no zero.
    """
    shifted = y * np.float32(16) - np.float32(1)
    offset = np.float32(0.5) if noise is None else _uniform(noise)
    return jnp.clip(jnp.floor(shifted + offset), 0, 15).astype(jnp.int32)


def linear_decode(code):
    """The values ``(k + 1) / 16`` (float32) of 4-bit linear codes."""
    return (code.astype(jnp.float32) + np.float32(1)) * np.float32(1 / 16)


def pack(codes, signed):
    """Two 4-bit codes per byte along the last axis (even length): element ``2j`` in the low
    nibble, ``2j + 1`` in the high one. Signed codes (``[-7, 7]``) are two's complement nibbles in
    int8, unsigned ones (``[0, 15]``) nibbles in uint8.

    XLA's 4-bit types do the packing (``(..., n, 2)`` 4-bit values bitcast to ``(..., n)`` bytes),
    which XLA:CPU vectorizes; shifting nibbles by element index ran 1.4x slower.
    """
    narrow, wide = (jnp.int4, jnp.int8) if signed else (jnp.uint4, jnp.uint8)
    pairs = codes.astype(narrow).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return lax.bitcast_convert_type(pairs, wide)


def unpack(packed):
    """The int32 codes of :func:`pack`'s bytes, last axis doubled (signed if ``packed`` is int8)."""
    narrow = jnp.int4 if packed.dtype == jnp.int8 else jnp.uint4
    pairs = lax.bitcast_convert_type(packed, narrow)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1]).astype(jnp.int32)


def peak(x, axis):
    """Largest magnitude of a 2-D ``x`` along ``axis``: NaN if any element is NaN, else inf if
    any is inf.

    It is the max of the float32 bits of ``|x|`` as unsigned integers, which order as the
    magnitudes do, with inf above every finite value and NaN above inf, on every backend. The
    reduction runs in two stages, over chunks of 32 along a row (8 down a column) and then over the
    chunks' maxima: XLA:CPU then computes ``x`` inside the first stage's loop. In one stage it
    writes ``x`` out in full and reads it back, 3 to 7 times slower on a 16M leaf.
    """
    bits = lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)
    length, chunk = bits.shape[axis], 32 if axis == 1 else 8
    if length > chunk and length % chunk == 0:
        split = bits.shape[:axis] + (length // chunk, chunk) + bits.shape[axis + 1:]
        parts = jnp.max(bits.reshape(split), axis=axis + 1)
        # the second stage reduces floats, so that XLA does not merge the stages back into one
        return jnp.max(lax.bitcast_convert_type(parts, jnp.float32), axis=axis)
    return lax.bitcast_convert_type(jnp.max(bits, axis=axis), jnp.float32)


_TINY = np.float32(np.finfo(np.float32).tiny)


def live_scale(peak_value):
    """The stored scale of a block whose largest magnitude is ``peak_value``: the peak itself; NaN
    for a non-finite block (all of it then decodes to NaN); 0 below the smallest normal float32,
    where dividing by it overflows once denormals flush to zero (such a block is stored as 0)."""
    finite = jnp.where(peak_value >= _TINY, peak_value, np.float32(0))
    return jnp.where(jnp.isfinite(peak_value), finite, np.float32(np.nan))


_BF16_MAX = np.float32(3.3895313892515355e38)  # the largest finite bfloat16


def bfloat16_up(scale):
    """A non-negative float32 scale rounded up to a bfloat16 value (returned in float32): at least
    the scale, within one bfloat16 ulp (2**-7) of it, at most the largest bfloat16; NaN stays NaN."""
    bits = lax.bitcast_convert_type(scale, jnp.uint32)
    up = lax.bitcast_convert_type((bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isnan(scale), scale, jnp.minimum(up, _BF16_MAX))


def reciprocal(scale):
    """``1 / scale`` for a positive scale, else 0 (the block's values are then stored as code 0).

    At least the smallest normal float32: the reciprocal of a scale above 2**126 is a denormal,
    which flushes to 0 on XLA:CPU. Values above 2**126 in such a block (only a saturated second
    moment reaches them) then round to the top code, the block's scale.
    """
    positive = scale > 0
    inverse = np.float32(1) / jnp.where(positive, scale, np.float32(1))
    return jnp.where(positive, jnp.maximum(inverse, _TINY), np.float32(0))
