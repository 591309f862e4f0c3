"""Block-wise dynamic 8-bit storage for a moment (Dettmers et al. 2021).

A moment leaf of ``n`` elements is cut, in row-major order, into blocks of ``block_size``
elements (the last block may be short). Each block keeps its largest magnitude ``absmax`` in
float32, and each element keeps one byte: the index of the code-table value nearest to
``x / absmax``. Decoding is ``table[code] * absmax``. The tables are the dynamic tree code of the
paper, signed for the first moment and unsigned for the second (which is never negative).

Layout: ``codes`` has the leaf's own shape (uint8), so it follows the param's sharding and holds no
padding; ``absmax`` is flat, one float32 per block. A leaf therefore costs
``n + 4 * ceil(n / block_size)`` bytes, 1.016 bytes per element for blocks of 256.

No zero point for the second moment: under the unsigned code a positive value never rounds to
0 but to the smallest positive code (3.25e-7 of its block's absmax). A second moment stored as 0
beside a nonzero first moment would make that element's step ``m / eps``: the zero-point problem
of Li et al. 2023, which here cost a character-level language model 5% of its loss.

Non-finite values: a block that holds a NaN or an infinity decodes to NaN in all of its elements
and leaves every other block untouched. Wrap the optimizer in ``optax.apply_if_finite`` to skip
such steps and keep the state finite.

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
  ICLR 2022, https://arxiv.org/abs/2110.02861
  Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
  https://arxiv.org/abs/2309.01507
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _dynamic_code(signed):
    """The 256 values of the dynamic tree code, sorted ascending, as float32.

    After the sign bit (signed code only), a run of ``e`` zero bits sets the decade ``10**-e``,
    a one bit ends the run, and the ``f`` bits left pick the centre of one of ``2**f`` equal bins
    of ``[0.1, 1]``. The one pattern left over (a negative zero, or the smallest decade of the
    unsigned code) stands for 1.0, so each block's largest element is stored exactly. This is the
    table of bitsandbytes' ``create_dynamic_map``.
    """
    magnitudes = []
    for decade in range(7):
        # signed: 2**decade bins per decade (one bit went to the sign); unsigned: twice as many
        bins = 2 ** decade if signed else 2 ** (decade + 1)
        edges = np.linspace(0.1, 1.0, bins + 1)
        magnitudes.append(10.0 ** (decade - 6) * (edges[:-1] + edges[1:]) / 2)
    magnitudes = np.concatenate(magnitudes)
    values = np.concatenate([magnitudes, -magnitudes] if signed else [magnitudes])
    values = np.sort(np.concatenate([values, [0.0, 1.0]]))
    assert values.size == 256 and np.unique(values).size == 256
    return values.astype(np.float32)


SIGNED_CODE = _dynamic_code(signed=True)
"""The signed dynamic tree code (256 float32 values in [-0.993, 1], sorted), for the first moment."""

UNSIGNED_CODE = _dynamic_code(signed=False)
"""The unsigned dynamic tree code (256 float32 values in [0, 1], sorted), for the second moment."""

# Nearest code, ties down: the index is the number of midpoints below x (as np.searchsorted).
_SIGNED_MIDPOINTS = (SIGNED_CODE[:-1] + SIGNED_CODE[1:]) / 2
_UNSIGNED_MIDPOINTS = (UNSIGNED_CODE[:-1] + UNSIGNED_CODE[1:]) / 2
# A binary search is ~100x slower than the rest of the step on CPU, so encoding reads a table
# instead: the float32 exponent and top _CELL_BITS mantissa bits of |x| pick a cell of [0, 1] that
# holds at most one midpoint; the table gives the code at the cell's lower end and one comparison
# with the next midpoint finishes the search. |x| below 2**-_CELL_BINADES (all codes 0) shares cell 0.
_CELL_BITS = 8
_CELL_BINADES = 25


def _cell_tables(midpoints):
    """Per-cell starting codes for x > 0 and x < 0, and midpoints padded with +inf."""
    first = (127 - _CELL_BINADES) << 23
    bits = first + (np.arange((_CELL_BINADES << _CELL_BITS) + 2, dtype=np.int64) << (23 - _CELL_BITS))
    edges = bits.astype(np.uint32).view(np.float32)
    low, high = edges[:-1].copy(), edges[1:]
    low[0] = 0.0
    assert np.all(np.searchsorted(midpoints, high, "left") - np.searchsorted(midpoints, low, "left") <= 1)
    assert np.all(np.searchsorted(midpoints, -low, "right") - np.searchsorted(midpoints, -high, "right") <= 1)
    positive = np.searchsorted(midpoints, low, "left").astype(np.uint8)
    negative = np.searchsorted(midpoints, -high, "right").astype(np.uint8)
    return positive, negative, np.append(midpoints, np.float32(np.inf))


_SIGNED_CELLS = _cell_tables(_SIGNED_MIDPOINTS)
_UNSIGNED_CELLS = _cell_tables(_UNSIGNED_MIDPOINTS)


def _lookup(table, index):
    """``table[index]`` for a constant table; the result is sharded like ``index``.

    Plain indexing cannot place the result when ``index`` is explicitly sharded (a mesh with
    ``AxisType.Explicit``, the default of ``jax.make_mesh``), so the sharding is given.
    """
    return jnp.asarray(table).at[index].get(out_sharding=jax.typeof(index).sharding)


def _encode(scaled, signed):
    """Index of the nearest code (ties down; positive never to 0 if unsigned) for values in [-1, 1]."""
    positive, negative, midpoints = _SIGNED_CELLS if signed else _UNSIGNED_CELLS
    if not signed:
        scaled = jnp.maximum(scaled, 0.0)
    bits = jax.lax.bitcast_convert_type(jnp.abs(scaled), jnp.uint32) >> (23 - _CELL_BITS)
    cell = jnp.clip(bits.astype(jnp.int32) - ((127 - _CELL_BINADES) << _CELL_BITS), 0, positive.size - 1)
    start = _lookup(positive, cell)
    if signed:
        start = jnp.where(scaled < 0, _lookup(negative, cell), start)
    codes = start + (scaled > _lookup(midpoints, start)).astype(jnp.uint8)
    if not signed:
        # no zero point: code 0 is 0.0 and code 1 the smallest positive value
        codes = jnp.maximum(codes, (scaled > 0).astype(jnp.uint8))
    return codes


# The code of 0.0 in each table: what a zero moment and an underflowed block hold.
_ZERO_CODE = {True: int(np.flatnonzero(SIGNED_CODE == 0)[0]), False: 0}
# Below the smallest normal float32 a block is stored as zero: x / absmax would be inf or NaN.
_TINY = np.finfo(np.float32).tiny


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A block-wise 8-bit array: one immutable pytree node, kept as one leaf of a moment tree.

    Attributes:
      codes: uint8 indices into the code table, with the shape of the array they encode.
      absmax: float32 scale of each block, shape ``(ceil(codes.size / block_size),)``.
      block_size: Elements per block (static).
      signed: Whether the signed code is used (static).
    """

    codes: jax.Array
    absmax: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))
    signed: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        """The shape of the encoded array."""
        return self.codes.shape

    def replace(self, **changes) -> "Quantized":
        """Returns a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Int8Spec:
    """How to keep a moment in 8 bits; pass as ``mu_dtype`` / ``nu_dtype``. See :func:`int8_moments`."""

    block_size: int = 256
    min_size: int = 4096


def int8_moments(block_size=256, min_size=4096):
    """A storage spec for block-wise dynamic 8-bit moments, accepted as ``mu_dtype``/``nu_dtype``.

    The string ``"int8"`` means ``int8_moments()``. Leaves with fewer than ``min_size`` elements
    are kept in float32, where 8 bits would save little and cost accuracy.

    Args:
      block_size: Elements per block sharing one float32 scale (a positive integer).
      min_size: Leaves smaller than this stay float32 (a non-negative integer).

    Returns:
      An :class:`Int8Spec`.

    Raises:
      ValueError: If ``block_size`` or ``min_size`` is out of range.

    Example:
      >>> import adamx
      >>> spec = adamx.int8_moments(block_size=128)
      >>> spec.block_size, spec.min_size
      (128, 4096)
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"adamx.int8_moments: block_size must be a positive integer, got {block_size!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"adamx.int8_moments: min_size must be a non-negative integer, got {min_size!r}")
    return Int8Spec(block_size=int(block_size), min_size=int(min_size))


def num_blocks(size, block_size):
    """Number of blocks for ``size`` elements (the last block may be short)."""
    return -(-size // block_size)


def _blocks(flat, block_size):
    """Pads a flat array with zeros to whole blocks and reshapes it to ``(blocks, block_size)``."""
    pad = num_blocks(flat.size, block_size) * block_size - flat.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


@functools.partial(jax.jit, static_argnames=("block_size", "signed"))
def quantize(x, *, block_size=256, signed=True):
    """Encodes ``x`` block-wise in 8 bits with the dynamic tree code.

    Args:
      x: A real float array (any shape). Computed in float32; float64 is rounded to float32 first.
      block_size: Elements per block sharing one float32 scale.
      signed: Use the signed code (for values of either sign) or the unsigned one (for ``x >= 0``;
        negative values are stored as 0, positive ones never are).

    Returns:
      A :class:`Quantized` with ``codes.shape == x.shape``.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> q = adamx.quantize(jnp.array([0.5, -1.0, 0.0, 2.0]), block_size=2)
      >>> q.absmax
      Array([1., 2.], dtype=float32)
      >>> adamx.dequantize(q)
      Array([ 0.50078124, -0.99296874,  0.        ,  2.        ], dtype=float32)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"adamx.quantize: x must be a real float array, got dtype {x.dtype}")
    encode = functools.partial(_encode_blocks, block_size=block_size, signed=signed)
    spec = _explicit_spec(x)
    if spec is not None:
        encode = jax.sharding.auto_axes(encode, out_sharding=(spec, jax.P()))
    codes, absmax = encode(x)
    return Quantized(codes=codes, absmax=absmax, block_size=block_size, signed=signed)


def _encode_blocks(x, *, block_size, signed):
    blocks = _blocks(x.astype(jnp.float32).reshape(-1), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # tested per element: a max reduction may drop NaN on some backends (XLA CPU does)
    finite = jnp.all(jnp.isfinite(blocks), axis=1)
    live = finite & (absmax >= _TINY)
    scaled = blocks / jnp.where(live, absmax, 1.0)[:, None]
    codes = _encode(scaled, signed)
    # a block too small for float32 is stored as exact zeros; a non-finite block as NaN scale
    codes = jnp.where(live[:, None], codes, jnp.uint8(_ZERO_CODE[signed]))
    absmax = jnp.where(live, absmax, jnp.where(finite, 0.0, jnp.nan)).astype(jnp.float32)
    return codes.reshape(-1)[: x.size].reshape(x.shape), absmax


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


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(q, dtype=jnp.float32):
    """Decodes a :class:`Quantized` array.

    Args:
      q: The encoded array.
      dtype: The dtype of the result (the decode itself runs in float32).

    Returns:
      An array of shape ``q.shape`` and dtype ``dtype``.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> q = adamx.quantize(jnp.array([0.0, 0.25, 1.0]), signed=False)
      >>> adamx.dequantize(q)
      Array([0.       , 0.2511719, 1.       ], dtype=float32)
    """
    decode = functools.partial(_decode_blocks, block_size=q.block_size, signed=q.signed)
    spec = _explicit_spec(q.codes)
    if spec is not None:
        decode = jax.sharding.auto_axes(decode, out_sharding=spec)
    return decode(q.codes, q.absmax).astype(dtype)


def _decode_blocks(codes, absmax, *, block_size, signed):
    table = SIGNED_CODE if signed else UNSIGNED_CODE
    values = _blocks(_lookup(table, codes.reshape(-1)), block_size) * absmax[:, None]
    return values.reshape(-1)[: codes.size].reshape(codes.shape)


def zeros(param, spec, *, signed):
    """A zero moment for ``param`` under an :class:`Int8Spec`.

    Args:
      param: An array or ``jax.ShapeDtypeStruct`` (real; the caller rejects complex first moments).
      spec: The :class:`Int8Spec`.
      signed: Whether the moment takes both signs (the first moment) or not (the second).

    Returns:
      A float32 zero array if ``param`` has fewer than ``spec.min_size`` elements, else a
      :class:`Quantized` zero whose codes follow the param's sharding.
    """
    size = int(np.prod(param.shape))
    if size < spec.min_size:
        return jnp.zeros_like(param, dtype=jnp.float32)
    return Quantized(
        codes=jnp.full_like(param, _ZERO_CODE[signed], dtype=jnp.uint8),
        absmax=jnp.zeros((num_blocks(size, spec.block_size),), jnp.float32),
        block_size=spec.block_size,
        signed=signed,
    )
