"""The storage formats of quantized moments: their NamedTuples, layouts, encoding and decoding.

See ``adamx/_quantize.py`` for the formats and their choice, ``adamx/_codes.py`` for the codes.
"""

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from adamx import _codes

_F32_MAX = np.float32(np.finfo(np.float32).max)
# (mantissa bits, top code) of the 8-bit log codes
_SIGNED8, _UNSIGNED8 = (3, 127), (4, 255)


class Int8Blocks(NamedTuple):
    """A moment stored block-wise in 8 bits.

    Attributes:
      codes: int8 (signed code, a first moment) or uint8 (unsigned, a second), the leaf's shape.
      absmax: float32, each block's largest magnitude: shape ``(ceil(size / block_size),)``.
    """

    codes: jax.Array
    absmax: jax.Array


class Int4Blocks(NamedTuple):
    """A first moment stored block-wise in 4 bits, two codes per byte along the last axis.

    Attributes:
      codes: int8, shape ``leaf.shape[:-1] + (leaf.shape[-1] // 2,)``.
      absmax: bfloat16, each block's largest magnitude rounded up to bfloat16 (so still at least
        every magnitude in the block): shape ``(ceil(size / block_size),)``.
    """

    codes: jax.Array
    absmax: jax.Array


class Int4Rank1(NamedTuple):
    """A second moment in 4 bits under rank-1 normalization (Li et al. 2023).

    Attributes:
      codes: uint8, two codes per byte along the last axis: ``leaf.shape[:-1] +
        (ceil(leaf.shape[-1] / 2),)``.
      row_max: float32, the largest value of each row: shape ``leaf.shape[:-1]``.
      col_max: float32, the largest value of each column: shape ``(leaf.shape[-1],)``.
    """

    codes: jax.Array
    row_max: jax.Array
    col_max: jax.Array


QUANTIZED = (Int8Blocks, Int4Blocks, Int4Rank1)
Quantized = Union[Int8Blocks, Int4Blocks, Int4Rank1]

for _cls in QUANTIZED:
    jax.export.register_namedtuple_serialization(_cls, serialized_name=f"adamx.{_cls.__name__}")


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized moment."""
    return isinstance(x, QUANTIZED)


def _rank1_fits(shape):
    rows, cols = math.prod(shape[:-1]), shape[-1] if shape else 0
    return len(shape) >= 2 and rows >= 2 and cols >= 2 and 32 * (rows + cols) <= rows * cols


def layout(shape, *, four, signed, block_size):
    """``(class, block_size)`` of a moment of ``shape`` stored in 8 or 4 bits (``four``).

    4 bits: a second moment takes rank-1 normalization if the leaf has rows and columns of at
    least 2 and no more than 1/32 of its size together (the scales then cost at most 1/8 byte per
    element), else 8-bit blocks of 256; a first moment takes 4-bit blocks if its last dimension is
    even (codes pair along it), else 8-bit blocks.
    """
    if four:
        if not signed and _rank1_fits(shape):
            return Int4Rank1, None
        if signed and shape[-1] % 2 == 0:
            return Int4Blocks, block_size
        return Int8Blocks, block_size if signed else 256
    return Int8Blocks, block_size


def block_length(size, blocks):
    """The block size of a ``size``-element leaf stored in ``blocks`` blocks."""
    if blocks <= 1:
        return max(size, 1)
    return 1 << (-(-size // blocks) - 1).bit_length()


def leaf_shape(q: Quantized) -> tuple:
    """The shape of the array a quantized moment stands for."""
    if isinstance(q, Int4Rank1):
        return tuple(q.row_max.shape) + tuple(q.col_max.shape)
    if isinstance(q, Int4Blocks):
        return tuple(q.codes.shape[:-1]) + (2 * q.codes.shape[-1],)
    return tuple(q.codes.shape)


def _signed(q):
    return not isinstance(q, Int4Rank1) and q.codes.dtype == jnp.int8


# ---- encoding and decoding ------------------------------------------------------------------

def _to_blocks(flat, length):
    """``flat`` zero-padded to whole blocks, shape ``(blocks, length)``."""
    pad = -flat.shape[0] % length
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(-1, length)


def _encode_blocks(x, noise, *, blocks, four, signed):
    size, length = x.size, block_length(x.size, blocks)
    values = _to_blocks(x.reshape(-1), length)
    if not signed:
        values = jnp.minimum(values, _F32_MAX)  # an overflowed square saturates; NaN stays NaN
    absmax = _codes.live_scale(_codes.peak(values, axis=1))
    if four:
        absmax = _codes.bfloat16_up(absmax).astype(jnp.float32)
    scaled = values * _codes.reciprocal(absmax)[:, None]
    if noise is not None:
        noise = _to_blocks(noise.reshape(-1), length)
    if four:
        codes = _codes.pack(_codes.square_encode(scaled, noise=noise), signed=True)
        return (codes.reshape(-1)[: size // 2].reshape(x.shape[:-1] + (-1,)),
                absmax.astype(jnp.bfloat16))
    mantissa, top = _SIGNED8 if signed else _UNSIGNED8
    codes = _codes.log_encode(scaled, mantissa=mantissa, top=top, signed=signed, noise=noise,
                              positive=None if signed else values > 0)
    codes = codes.astype(jnp.int8 if signed else jnp.uint8)
    return codes.reshape(-1)[:size].reshape(x.shape), absmax


def _decode_blocks(codes, absmax, *, shape, four):
    size = math.prod(shape)
    length = block_length(size, absmax.shape[0])
    if four:
        values = _codes.square_decode(_codes.unpack(_to_blocks(codes.reshape(-1), length // 2)))
    else:
        mantissa, top = _SIGNED8 if codes.dtype == jnp.int8 else _UNSIGNED8
        values = _codes.log_decode(_to_blocks(codes.reshape(-1), length), mantissa=mantissa,
                                   top=top)
    return (values * absmax.astype(jnp.float32)[:, None]).reshape(-1)[:size].reshape(shape)


def _encode_rank1(x, noise):
    shape = x.shape
    values = jnp.minimum(x.reshape(-1, shape[-1]), _F32_MAX)
    row_max = _codes.live_scale(_codes.peak(values, axis=1))
    col_max = _codes.live_scale(_codes.peak(values, axis=0))
    # 1 / min(r, c) = max(1 / r, 1 / c) exactly: a division per row and column, not per element
    scaled = values * jnp.maximum(_codes.reciprocal(row_max)[:, None],
                                  _codes.reciprocal(col_max)[None, :])
    codes = _codes.linear_encode(scaled, noise=None if noise is None else noise.reshape(values.shape))
    if shape[-1] % 2:
        codes = jnp.pad(codes, ((0, 0), (0, 1)))
    codes = _codes.pack(codes, signed=False)
    return codes.reshape(shape[:-1] + (-1,)), row_max.reshape(shape[:-1]), col_max


def _decode_rank1(codes, row_max, col_max):
    cols = col_max.shape[0]
    values = _codes.linear_decode(_codes.unpack(codes.reshape(-1, codes.shape[-1]))[:, :cols])
    scale = jnp.minimum(row_max.reshape(-1, 1), col_max[None, :])
    return (values * scale).reshape(row_max.shape + (cols,))


def _explicit_spec(x):
    """The PartitionSpec of ``x`` if it is sharded over explicit mesh axes, else None.

    Explicit sharding has no rule for regrouping a sharded array into blocks, so such arrays are
    encoded and decoded under ``jax.sharding.auto_axes``, where the compiler places the blocks.
    """
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind == jax.sharding.AxisType.Explicit}
    used = {axis for entry in sharding.spec if entry is not None
            for axis in (entry if isinstance(entry, tuple) else (entry,))}
    return sharding.spec if used & explicit else None


def encode(x: jax.Array, like: Quantized, noise: Optional[jax.Array] = None) -> Quantized:
    """``x`` (the leaf's shape) encoded in the format of ``like``.

    ``noise``: uint32 random bits of ``x``'s shape for stochastic rounding (a signed code takes
    the low 16 bits, an unsigned one the high 16, so one draw serves a leaf's moments), or None to
    round to nearest.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    signed = _signed(like)
    if noise is not None:
        noise = noise & np.uint32(0xFFFF) if signed else noise >> np.uint32(16)
    if isinstance(like, Int4Rank1):
        run, outs = _encode_rank1, lambda e: (PartitionSpec(*e), PartitionSpec(*e[:-1]),
                                              PartitionSpec(e[-1]))
    else:
        def run(x, noise):
            return _encode_blocks(x, noise, blocks=like.absmax.shape[0],
                                  four=isinstance(like, Int4Blocks), signed=signed)

        def outs(e):
            return PartitionSpec(*e), PartitionSpec()
    spec = _explicit_spec(x)
    if spec is not None:
        entries = list(spec) + [None] * (x.ndim - len(spec))
        run = jax.sharding.auto_axes(run, out_sharding=outs(entries))
    return type(like)(*run(x, noise))


def decode(q: Quantized, dtype: Any = jnp.float32) -> jax.Array:
    """The array a quantized moment stands for, in ``dtype`` (decoded in float32)."""
    if isinstance(q, Int4Rank1):
        run = _decode_rank1
    else:
        def run(*arrays):
            return _decode_blocks(*arrays, shape=leaf_shape(q), four=isinstance(q, Int4Blocks))
    spec = _explicit_spec(q.codes)
    if spec is not None:
        entries = list(spec) + [None] * (q.codes.ndim - len(spec))
        if leaf_shape(q)[-1] != q.codes.shape[-1]:
            entries[-1] = None
        run = jax.sharding.auto_axes(run, out_sharding=PartitionSpec(*entries))
    return run(*q).astype(dtype)
