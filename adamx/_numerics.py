"""Small numerical helpers, each here because the obvious one-liner loses precision, wraps, or is
not the same on every backend."""

import functools
import numbers
import zlib

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def safe_increment(count):
    """Returns ``count + 1``, staying at the int32 maximum instead of wrapping to a negative step."""
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


def one_minus(b):
    """Returns ``1 - b``, in Python float64 when ``b`` is a Python number.

    ``1 - float32(0.999)`` is off by 1.3e-5 relative; computing it before the cast keeps the
    small quantity ``1 - b`` (which scales every moment update) accurate to float32 rounding.
    """
    if isinstance(b, numbers.Real):
        return 1.0 - float(b)
    return 1 - b


def compute_dtype(dtype):
    """The real dtype the math runs in for a leaf of ``dtype``: float32, or float64 for float64.

    float16 and bfloat16 leaves are widened so that ``sqrt(v) + eps`` never rounds eps away
    (0/0 for a zero gradient) and bias corrections never round to zero.
    """
    wide = jnp.finfo(dtype).dtype == jnp.float64
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def complex_dtype(real):
    """The complex dtype whose parts are ``real`` (float32 -> complex64, float64 -> complex128)."""
    return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)


def bias_correction(one_minus_b, t, dtype):
    """Returns ``1 - b**t`` in ``dtype``, as ``(1 - b) * expm1(t log b) / expm1(log b)``.

    The direct form loses the low bits of ``b**t`` when it is close to 1 (in float32,
    ``1 - 0.999**t`` is off by up to 330 ulps); this one stays within a few ulps of the float64
    value, is exactly ``1 - b`` at t = 1, and is 1 for b = 0.

    Args:
      one_minus_b: ``1 - b``, as returned by :func:`one_minus`.
      t: The step count (>= 1), an integer array.
      dtype: The float dtype to compute in (float32 or wider).

    Returns:
      A scalar array of ``dtype``.
    """
    one_minus_b = jnp.asarray(one_minus_b, dtype)
    log_b = jnp.log1p(-one_minus_b)
    return one_minus_b * (jnp.expm1(t.astype(dtype) * log_b) / jnp.expm1(log_b))


def abs_sq(g):
    """``|g|**2`` as a real array (complex leaves give their squared modulus)."""
    if jnp.iscomplexobj(g):
        return jnp.square(g.real) + jnp.square(g.imag)
    return jnp.square(g)


def rounds(dtype, mode):
    """Whether ``mode`` changes how a param of ``dtype`` is written (only 16-bit floats round)."""
    return mode != "nearest" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)


# ---- random bits for stochastic rounding -------------------------------------------------------

# Random bits are a pure function of (seed, count, stream, element index): reproducible run to run,
# the same on one device or many, with no global RNG state. A leaf's stream comes from its key
# path, so two transformations over different leaves (optax.multi_transform) draw different bits.
# A leaf's quantized moments draw from its stream xor MOMENTS, its param's rounding from the
# stream itself.
MOMENTS = 0x6A09E667


def stream(path: tuple) -> int:
    """The 32-bit stream number of the leaf at ``path`` (a key path): CRC-32 of its key string."""
    return zlib.crc32(jax.tree_util.keystr(path).encode())


def _mix32(x):
    """A bijective 32-bit mixer (lowbias32): every input bit reaches every output bit, so
    consecutive counters give unrelated outputs. On JAX arrays, or NumPy uint32 at trace time."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def bits_key(seed, count, stream):
    """The uint32 key of one leaf's random bits at one step: the step's key (a mix of the seed's
    and the count) plus the leaf's (a mix of its stream, computed when tracing). The leaf's part
    is a constant, so a step computes one key for all its leaves."""
    step = _mix32(_mix32(jnp.asarray(seed, jnp.uint32) ^ np.uint32(0x9E3779B9))
                  ^ jnp.asarray(count, jnp.uint32))
    return step + _mix32(np.asarray(stream, np.uint64).astype(np.uint32))


def leaf_keys(seed, count, paths) -> jax.Array:
    """The keys of each leaf's random bits at one step: uint32 ``[param's, moments'] x leaves``,
    for the leaves at key ``paths``."""
    streams = np.array([stream(path) for path in paths], np.uint32).reshape(-1)
    return bits_key(seed, count, np.stack([streams, streams ^ np.uint32(MOMENTS)]))


def random_bits(shape, key, sharding=None):
    """Uniform uint32 bits for each element of an array of ``shape``: ``mix(index * phi + key)``
    with ``index`` the element's row-major position, built from iotas so that a sharded array
    gets the bits of its own elements."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, dim, out_sharding=sharding)
        index = index + iota * np.uint32(stride & 0xFFFFFFFF)
        stride *= shape[dim]
    return _mix32(index * np.uint32(0x9E3779B9) + key)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def stochastic_round(x, bits, dtype):
    """Rounds float32 ``x`` to ``dtype`` (bfloat16 or float16), up with probability equal to the
    distance from the lower neighbour in units of the gap, so ``E[result] = x``.

    ``bits``: uniform uint32 random bits of ``x``'s shape. Non-finite values pass through, and a
    value that would round up to infinity rounds to nearest instead. Its
    derivative is the identity (a straight-through estimate), as rounding to nearest has.
    """
    x = x.astype(jnp.float32)
    if jnp.dtype(dtype) == jnp.bfloat16:
        # bfloat16 is float32 without its low 16 bits: add random low bits, then cut them off.
        raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
        cut = (raw + (bits >> 16)) & np.uint32(0xFFFF0000)
        rounded = jax.lax.bitcast_convert_type(cut, jnp.float32)
    else:
        # float16: floor(|x| / gap + u) * gap, exact in float32 (|x| / gap < 2**11 and the gap is
        # a power of two of at least 2**-24); the gap is float16's at |x|, subnormals included.
        finfo = jnp.finfo(dtype)
        raw = jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)
        exponent = jnp.maximum((raw >> 23).astype(jnp.int32) - 127, finfo.minexp)
        gap = jax.lax.bitcast_convert_type(((exponent - finfo.nmant + 127) << 23), jnp.float32)
        u = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        rounded = jnp.copysign(jnp.floor(jnp.abs(x) / gap + u) * gap, x)
    rounded = jnp.where(jnp.isfinite(x), rounded, x).astype(dtype)
    # Up past the dtype's largest value is infinity: round to nearest there, which is finite
    # below the overflow threshold as rounding to nearest everywhere would be.
    return jnp.where(jnp.isinf(rounded), x.astype(dtype), rounded)


@stochastic_round.defjvp
def _stochastic_round_jvp(dtype, primals, tangents):
    y = stochastic_round(*primals, dtype)
    return y, tangents[0].astype(y.dtype)
