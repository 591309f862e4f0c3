"""Quantized moments: block-wise 8-bit and 4-bit storage, and rank-1 normalized 4-bit.

A quantized moment is a NamedTuple of arrays whose format the arrays themselves say, so
``flax.serialization``, orbax, ``lax.scan``/``lax.cond``, ``optax.MultiSteps`` and ``jax.export``
carry it like any other pytree node:

* :class:`Int8Blocks` ``(codes, absmax)``: the leaf cut in row-major order into blocks of ``B``
  elements, a power of two (the last block may be short). ``absmax`` holds each block's largest
  magnitude in float32, ``codes`` one byte per element with the leaf's shape (so they follow the
  param's sharding). int8 codes are the signed log code of a first moment, uint8 the unsigned one of
  a second (see ``adamx/_codes.py``). ``n + 4 ceil(n / B)`` bytes: 1.016 per element for B = 256.
* :class:`Int4Blocks` ``(codes, absmax)``: the same with two 4-bit codes per byte along the last
  axis, which must be even (``codes.shape[-1]`` is half of it), a first moment's square code, and
  the scales rounded up to bfloat16. 0.5625 bytes per element for B = 32 (blocks of 128 cost a
  character language model +1.4% of held-out loss, blocks of 32 +0.5%, over float32 moments).
* :class:`Int4Rank1` ``(codes, row_max, col_max)``: a second moment under Li et al.'s rank-1
  normalization, for a leaf seen as rows (all leading axes) by columns (the last axis): element
  ``(i, j)`` is scaled by ``min(row_max[i], col_max[j])`` and stored in the linear code
  ``(k + 1) / 16``, two per byte along the last axis (padded to even). ``row_max`` has the leading
  axes' shape and ``col_max`` the last axis's, so the leaf's shape is theirs joined.

With ``n > 1`` blocks of a ``size``-element leaf the block size is the power of two at or above
``ceil(size / n)``; with one block any size at or above ``size`` decodes alike. A signed code is
stored in int8, an unsigned one in uint8.

Training rounds codes stochastically (see ``adamx/_codes.py``), so a positive second moment never
decodes to 0. Non-finite values: a NaN or infinity makes its own block (under rank-1: its row and
its column) decode to NaN, and no other element. A second moment is stored at most at the float32
maximum, so one finite gradient whose square overflows (``|g| > 1.8e19``) leaves its block finite:
its own update is 0, as with float32 moments, and its neighbours decode to at least the code's
floor (``2**-16`` of the maximum, 1/16 under rank-1), which keeps their steps near 0 until that
value decays (``b2**t``), where float32 moments would leave them alone.

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
  ICLR 2022, https://arxiv.org/abs/2110.02861
  Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
  https://arxiv.org/abs/2309.01507
"""

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adamx import _formats
from adamx._formats import Int4Blocks, Int4Rank1, Int8Blocks, Quantized

__all__ = [
    "Int4Blocks", "Int4Rank1", "Int4Spec", "Int8Blocks", "Int8Spec", "dequantize", "dequantize_state",
    "int4_moments", "int8_moments", "quantize",
]


@dataclasses.dataclass(frozen=True)
class Int8Spec:
    """How to keep a moment in 8 bits; pass as ``mu_dtype`` / ``nu_dtype``. See :func:`int8_moments`."""

    block_size: int = 256
    min_size: int = 4096


@dataclasses.dataclass(frozen=True)
class Int4Spec:
    """How to keep a moment in 4 bits; pass as ``mu_dtype`` / ``nu_dtype``. See :func:`int4_moments`."""

    block_size: int = 32
    min_size: int = 4096


def _check_sizes(fn, block_size, min_size):
    def integer(x):
        return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer))

    if not (integer(block_size) and 2 <= block_size <= 2**30 and block_size & (block_size - 1) == 0):
        raise ValueError(f"{fn}: block_size must be a power of two in [2, 2**30], got {block_size!r}")
    if not (integer(min_size) and 0 <= min_size < 2**63):
        raise ValueError(f"{fn}: min_size must be an integer in [0, 2**63), got {min_size!r}")
    return int(block_size), int(min_size)


def int8_moments(block_size: int = 256, min_size: int = 4096) -> Int8Spec:
    """A storage spec for block-wise 8-bit moments, accepted as ``mu_dtype``/``nu_dtype``.

    The string ``"int8"`` means ``int8_moments()``. A moment takes :class:`Int8Blocks`, 1.016
    bytes per element; scalars and leaves with fewer than ``min_size`` elements stay float32.

    Args:
      block_size: Elements per block sharing one float32 scale: a power of two in [2, 2**30].
      min_size: Leaves smaller than this stay float32: an integer in [0, 2**63).

    Returns:
      An :class:`Int8Spec`.

    Raises:
      ValueError: If ``block_size`` or ``min_size`` is out of range.

    Example:
      >>> import adamx
      >>> adamx.int8_moments(block_size=128)
      Int8Spec(block_size=128, min_size=4096)
    """
    return Int8Spec(*_check_sizes("adamx.int8_moments", block_size, min_size))


def int4_moments(block_size: int = 32, min_size: int = 4096) -> Int4Spec:
    """A storage spec for 4-bit moments (Li et al. 2023), accepted as ``mu_dtype``/``nu_dtype``.

    The string ``"int4"`` means ``int4_moments()``. A first moment takes :class:`Int4Blocks`
    (0.5625 bytes per element for blocks of 32, with bfloat16 scales), or :class:`Int8Blocks` if
    its last dimension is odd. A second moment takes :class:`Int4Rank1` (0.5 bytes per element
    and a float32 per row and column) if the leaf has rows and columns of at least 2 and no more
    than 1/32 of its size together, else :class:`Int8Blocks` (1-D leaves: a 4-bit linear code per
    block cost 5% of held-out loss on a regression). Scalars and leaves with fewer than
    ``min_size`` elements stay float32.

    Args:
      block_size: Elements per block of a first moment: a power of two in [2, 2**30].
      min_size: Leaves smaller than this stay float32: an integer in [0, 2**63).

    Returns:
      An :class:`Int4Spec`.

    Raises:
      ValueError: If ``block_size`` or ``min_size`` is out of range.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.zeros((256, 512))}, mu_dtype="int4", nu_dtype="int4")
      >>> type(state.mu["w"]).__name__, state.mu["w"].codes.shape
      ('Int4Blocks', (256, 256))
      >>> type(state.nu["w"]).__name__, state.nu["w"].row_max.shape, state.nu["w"].col_max.shape
      ('Int4Rank1', (256,), (512,))
    """
    return Int4Spec(*_check_sizes("adamx.int4_moments", block_size, min_size))


# ---- zeros, following the param's sharding ---------------------------------------------------

def _like(param, shape, dtype, entries):
    """Zeros of ``shape`` placed as ``lax.full_like`` places ``param``'s zeros, with the param's
    partition spec mapped by ``entries`` (a function of the padded spec)."""
    if isinstance(param, jax.core.Tracer):
        sharding = jax.typeof(param).sharding
    else:
        sharding = getattr(param, "sharding", None)
        if getattr(param, "_committed", True) is False:
            sharding = None
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * (len(np.shape(param)) - len(sharding.spec))
        spec = [e if e is None or shape[d] % _axis_size(sharding.mesh, e) == 0 else None
                for d, e in enumerate(entries(spec))]
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
    else:
        sharding = None
    return jax.lax.full(shape, 0, dtype, sharding=sharding)


def _axis_size(mesh, entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def zeros(param: Any, spec: Union[Int8Spec, Int4Spec], *, signed: bool) -> Any:
    """A zero moment for ``param`` under ``spec``: a quantized moment, or a float32 array for a
    scalar or below ``spec.min_size``. Codes (and row maxima) follow the param's sharding where
    they divide."""
    shape = tuple(np.shape(param))
    size = math.prod(shape)
    if size == 0 or not shape or size < spec.min_size:  # a scalar has no block to share
        return jnp.zeros_like(param, dtype=jnp.float32)
    cls, block = _formats.layout(shape, four=isinstance(spec, Int4Spec), signed=signed,
                                 block_size=spec.block_size)
    codes_dtype = jnp.int8 if signed else jnp.uint8
    if cls is Int4Rank1:
        packed = shape[:-1] + ((shape[-1] + 1) // 2,)
        return Int4Rank1(_like(param, packed, jnp.uint8, lambda s: s),
                         _like(param, shape[:-1], jnp.float32, lambda s: s[:-1]),
                         jnp.zeros(shape[-1:], jnp.float32))
    blocks = -(-size // block)
    if cls is Int4Blocks:
        return Int4Blocks(_like(param, shape[:-1] + (shape[-1] // 2,), codes_dtype, lambda s: s),
                          jnp.zeros((blocks,), jnp.bfloat16))
    return Int8Blocks(jnp.zeros_like(param, dtype=codes_dtype), jnp.zeros((blocks,), jnp.float32))


# ---- public encode / decode ------------------------------------------------------------------

def quantize(x: jax.typing.ArrayLike, spec: Union[str, Int8Spec, Int4Spec] = "int8", *,
             signed: bool = True, random_bits: Optional[jax.Array] = None) -> Quantized:
    """Encodes ``x`` as a quantized moment would store it (whatever its size: no ``min_size``).

    Args:
      x: A real float array; encoded in float32.
      spec: ``"int8"``, ``"int4"``, or a spec from :func:`int8_moments` / :func:`int4_moments`.
      signed: A first moment's signed code, or a second moment's unsigned one (for ``x >= 0``;
        negative values are stored as 0, positive ones never are).
      random_bits: uint32 random bits of ``x``'s shape to round stochastically (as training does),
        or None to round to nearest.

    Returns:
      An :class:`Int8Blocks`, :class:`Int4Blocks` or :class:`Int4Rank1`, as :func:`int4_moments`
      describes.

    Raises:
      ValueError: For an unknown spec, or an empty or 0-d ``x``.
      TypeError: If ``x`` is not a real float array.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> q = adamx.quantize(jnp.array([0.5, -1.0, 0.0, 2.0]))
      >>> q.codes, q.absmax
      (Array([ 111, -119,    0,  127], dtype=int8), Array([2.], dtype=float32))
      >>> adamx.dequantize(q)
      Array([ 0.5, -1. ,  0. ,  2. ], dtype=float32)
    """
    if isinstance(spec, str) and spec in ("int8", "int4"):
        spec = int8_moments() if spec == "int8" else int4_moments()
    if not isinstance(spec, (Int8Spec, Int4Spec)):
        raise ValueError(f'adamx.quantize: spec must be "int8", "int4", an Int8Spec or an Int4Spec, '
                         f"got {spec!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"adamx.quantize: x must be a real float array, got dtype {x.dtype}")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"adamx.quantize: x must have at least one dimension and one element, "
                         f"got shape {x.shape}")
    like = jax.eval_shape(lambda: zeros(jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                        dataclasses.replace(spec, min_size=0), signed=signed))
    return _encode(x, like, random_bits)


def dequantize(q: Quantized, dtype: Any = jnp.float32) -> jax.Array:
    """Decodes a quantized moment.

    Args:
      q: An :class:`Int8Blocks`, :class:`Int4Blocks` or :class:`Int4Rank1`.
      dtype: The dtype of the result (the decoding runs in float32).

    Returns:
      The array ``q`` stands for: its shape is read from ``q``'s arrays.

    Raises:
      TypeError: If ``q`` is not a quantized moment.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> v = jnp.outer(jnp.arange(1.0, 65.0), jnp.ones(128))  # 64 rows of 128: 1, 2, .., 64
      >>> q = adamx.quantize(v, "int4", signed=False)
      >>> type(q).__name__, q.codes.shape, q.row_max.shape, q.col_max.shape
      ('Int4Rank1', (64, 64), (64,), (128,))
      >>> adamx.dequantize(q)[:3, :2]
      Array([[1., 1.],
             [2., 2.],
             [3., 3.]], dtype=float32)
    """
    if not _formats.is_quantized(q):
        raise TypeError(f"adamx.dequantize: q must be an Int8Blocks, Int4Blocks or Int4Rank1, got "
                        f"{type(q).__name__}")
    return _decode(q, dtype)


_encode = jax.jit(_formats.encode, static_argnums=1)
_decode = jax.jit(_formats.decode, static_argnums=1)


def dequantize_state(state: Any) -> Any:
    """The same state with every quantized moment decoded to float32; other leaves unchanged.

    Tree utilities such as ``optax.tree.norm`` read a quantized moment's raw codes and scales
    (the norm of a fresh 8-bit state is not 0); apply them to ``dequantize_state(state)``.

    Args:
      state: An :class:`adamx.AdamState`, or any pytree holding one (an optax chain's state).

    Returns:
      A pytree of the same structure, except that each quantized moment is now one float32 array.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> state = adamx.init({"w": jnp.zeros((64, 128))}, mu_dtype="int8", nu_dtype="int8")
      >>> float(optax.tree.norm(adamx.dequantize_state(state)))
      0.0
      >>> adamx.dequantize_state(state).mu["w"].dtype
      dtype('float32')
    """
    return jax.tree.map(lambda x: _formats.decode(x) if _formats.is_quantized(x) else x, state,
                        is_leaf=_formats.is_quantized)


def check(fn: str, where: str, moment: Quantized, shape: tuple) -> None:
    """Raises ValueError (naming ``where``) if a quantized moment cannot stand for a leaf of
    ``shape``: an array that is missing or of another dtype or shape than the format needs."""
    shape = tuple(shape)
    name = type(moment).__name__
    for field in moment._fields:
        a = getattr(moment, field)
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            raise ValueError(f"{fn}: {where}.{field} must be an array, got {type(a).__name__}")
    codes = {Int8Blocks: ("int8", "uint8"), Int4Blocks: ("int8",), Int4Rank1: ("uint8",)}
    for field in moment._fields:
        dtype = str(jnp.dtype(getattr(moment, field).dtype))
        scale = "bfloat16" if isinstance(moment, Int4Blocks) else "float32"
        allowed = codes[type(moment)] if field == "codes" else (scale,)
        if dtype not in allowed:
            raise ValueError(f"{fn}: {where}.{field} of an {name} must be {' or '.join(allowed)}, "
                             f"got {dtype}")
    if not shape or (isinstance(moment, Int4Blocks) and shape[-1] % 2):
        raise ValueError(f"{fn}: {where} is an {name}, which cannot hold a grads' leaf of shape "
                         f"{shape}" + (" (its last dimension must be even)" if shape else ""))
    if isinstance(moment, Int4Rank1):
        want = {"codes": shape[:-1] + ((shape[-1] + 1) // 2,), "row_max": shape[:-1],
                "col_max": shape[-1:]}
    else:
        want = {"codes": shape if isinstance(moment, Int8Blocks) else shape[:-1] + (shape[-1] // 2,)}
    for field, expected in want.items():
        got = tuple(getattr(moment, field).shape)
        if got != expected:
            raise ValueError(f"{fn}: {where}.{field} has shape {got}, but a grads' leaf of shape "
                             f"{shape} needs {expected}")
    if not isinstance(moment, Int4Rank1):
        size = math.prod(shape)
        blocks = moment.absmax.shape[0] if len(moment.absmax.shape) == 1 else 0
        if blocks < 1 or -(-size // _formats.block_length(size, blocks)) != blocks:
            raise ValueError(f"{fn}: {where}.absmax has shape {tuple(moment.absmax.shape)}, which "
                             f"is no number of power-of-two blocks of a grads' leaf of shape {shape}")
