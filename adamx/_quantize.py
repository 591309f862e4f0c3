"""Quantized moments, the public side: the specs a user passes as ``mu_dtype``/``nu_dtype``, and
:func:`quantize`, :func:`dequantize`, :func:`dequantize_state`, thin over ``adamx/_formats.py``.

A spec picks a format per leaf. Scalars and leaves smaller than ``min_size`` stay float32 (a
scalar has no block to share); so does nothing else:

* :class:`Int8Spec`: :class:`adamx.Int8Blocks` of ``block_size``.
* :class:`Int4Spec`: a first moment in :class:`adamx.Int4Blocks` of ``block_size`` when its last
  dimension is even, a second moment in :class:`adamx.Int4Rank1` when the leaf is a matrix that
  rank-1 suits (:meth:`adamx.Int4Rank1.fits`); any other moment in :class:`adamx.Int8Blocks` of
  ``block_size`` (a 4-bit code per block cost a 1-D second moment far more than 8 bits do).
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _formats
from adamx._formats import Int4Blocks, Int4Rank1, Int8Blocks, Quantized


def _check_sizes(name, block_size, min_size):
    def integer(x):
        return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer))

    if not (integer(block_size) and 2 <= block_size <= 2**30 and block_size & (block_size - 1) == 0):
        raise ValueError(f"{name}: block_size must be a power of two in [2, 2**30], got "
                         f"{block_size!r}")
    if not (integer(min_size) and 0 <= min_size < 2**63):
        raise ValueError(f"{name}: min_size must be an integer in [0, 2**63), got {min_size!r}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What the two specs share: their fields' checks, and zeros by the format they pick."""

    block_size: int
    min_size: int

    def __post_init__(self):
        _check_sizes(f"adamx.{type(self).__name__}", self.block_size, self.min_size)

    def format(self, shape: tuple, signed: bool) -> type:
        """The format class of a moment of a leaf of ``shape`` (not below ``min_size``)."""
        raise NotImplementedError

    def zeros(self, param: Any, signed: bool) -> Any:
        """The zero moment of ``param`` (an array or ``jax.ShapeDtypeStruct``) under this spec."""
        shape = tuple(np.shape(param))
        if not shape or math.prod(shape) < max(self.min_size, 1):
            return jnp.zeros_like(param, dtype=jnp.float32)
        return self.format(shape, signed).zeros(param, self.block_size, signed)


@dataclasses.dataclass(frozen=True)
class Int8Spec(_Spec):
    """Keep a moment in 8-bit blocks; pass as ``mu_dtype``/``nu_dtype``. See :func:`int8_moments`.

    Raises:
      ValueError: If ``block_size`` is not a power of two in [2, 2**30] or ``min_size`` is not an
        integer in [0, 2**63).
    """

    block_size: int = 256
    min_size: int = 4096

    def format(self, shape, signed):
        return Int8Blocks


@dataclasses.dataclass(frozen=True)
class Int4Spec(_Spec):
    """Keep a moment in 4 bits; pass as ``mu_dtype``/``nu_dtype``. See :func:`int4_moments`.

    Raises:
      ValueError: As :class:`Int8Spec`.
    """

    block_size: int = 32
    min_size: int = 4096

    def format(self, shape, signed):
        if signed and shape[-1] % 2 == 0:
            return Int4Blocks
        if not signed and Int4Rank1.fits(shape):
            return Int4Rank1
        return Int8Blocks


Spec = Union[Int8Spec, Int4Spec]


def as_spec(value: Any) -> Optional[Spec]:
    """``"int8"``/``"int4"`` as their default specs; a spec as itself; anything else None."""
    if isinstance(value, _Spec):
        return value
    if isinstance(value, str) and value in ("int8", "int4"):
        return Int8Spec() if value == "int8" else Int4Spec()
    return None


def int8_moments(block_size: int = 256, min_size: int = 4096) -> Int8Spec:
    """A spec for block-wise 8-bit moments, accepted as ``mu_dtype``/``nu_dtype``.

    The string ``"int8"`` means ``int8_moments()``. A moment takes :class:`adamx.Int8Blocks`,
    1.016 bytes per element for blocks of 256; scalars and leaves with fewer than ``min_size``
    elements stay float32.

    Args:
      block_size: Elements per block sharing one float32 scale: a power of two in [2, 2**30].
      min_size: Leaves smaller than this stay float32: an integer in [0, 2**63).

    Returns:
      An :class:`Int8Spec`.

    Raises:
      ValueError: If ``block_size`` or ``min_size`` is out of range.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.zeros((64, 128))}, mu_dtype=adamx.int8_moments(128))
      >>> state.mu["w"].codes.dtype, state.mu["w"].absmax.shape  # 8192 elements, 64 blocks
      (dtype('int8'), (64,))
    """
    return Int8Spec(block_size, min_size)


def int4_moments(block_size: int = 32, min_size: int = 4096) -> Int4Spec:
    """A spec for 4-bit moments (Li et al. 2023), accepted as ``mu_dtype``/``nu_dtype``.

    The string ``"int4"`` means ``int4_moments()``. A first moment takes :class:`adamx.Int4Blocks`
    (0.5625 bytes per element for blocks of 32, with bfloat16 scales); a second moment
    :class:`adamx.Int4Rank1` (0.5 bytes per element, and a float32 per row and column) if the leaf
    is a matrix with rows and columns of at least 2 and no more than 1/32 of its size together.
    A moment neither suits (a first moment whose last dimension is odd, a 1-D second moment) takes
    :class:`adamx.Int8Blocks` of the same ``block_size``. Scalars and leaves with fewer than
    ``min_size`` elements stay float32.

    Args:
      block_size: Elements per block: a power of two in [2, 2**30].
      min_size: Leaves smaller than this stay float32: an integer in [0, 2**63).

    Returns:
      An :class:`Int4Spec`.

    Raises:
      ValueError: If ``block_size`` or ``min_size`` is out of range.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.zeros((256, 512))}, mu_dtype="int4", nu_dtype="int4")
      >>> type(state.mu["w"]).__name__, state.mu["w"].codes.shape
      ('Int4Blocks', (256, 256))
      >>> type(state.nu["w"]).__name__, state.nu["w"].row_max.shape, state.nu["w"].col_max.shape
      ('Int4Rank1', (256,), (512,))
    """
    return Int4Spec(block_size, min_size)


# ---- encode and decode, for users and tests -------------------------------------------------

def quantize(x: jax.typing.ArrayLike, spec: Union[str, Spec] = "int8", *, signed: bool = True,
             random_bits: Optional[jax.Array] = None) -> Quantized:
    """Encodes ``x`` as a quantized moment would store it (whatever its size: no ``min_size``).

    Args:
      x: A real float array with at least one dimension and one element; encoded in float32.
      spec: ``"int8"``, ``"int4"``, or a spec from :func:`int8_moments` / :func:`int4_moments`.
      signed: A first moment's signed code, or a second moment's unsigned one (for ``x >= 0``;
        negative values are stored as 0, positive ones never are).
      random_bits: uint32 random bits of ``x``'s shape to round stochastically (a signed code uses
        the low 16 bits, an unsigned one the high 16, as training does), or None to round to
        nearest.

    Returns:
      An :class:`adamx.Int8Blocks`, :class:`adamx.Int4Blocks` or :class:`adamx.Int4Rank1`, as the
      spec picks for ``x``'s shape.

    Raises:
      ValueError: For an unknown spec, an empty or 0-d ``x``, or random bits of another shape.
      TypeError: If ``x`` is not a real float array, ``signed`` not a bool, or the random bits
        not uint32.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> q = adamx.quantize(jnp.array([0.5, -1.0, 0.0, 2.0]))
      >>> q.codes, q.absmax
      (Array([ 111, -119,    0,  127], dtype=int8), Array([2.], dtype=float32))
      >>> adamx.dequantize(q)
      Array([ 0.5, -1. ,  0. ,  2. ], dtype=float32)
    """
    caller = "adamx.quantize"
    canonical = as_spec(spec)
    if canonical is None:
        raise ValueError(f'{caller}: spec must be "int8", "int4", an Int8Spec or an Int4Spec, got '
                         f"{spec!r}")
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"{caller}: signed must be True or False, got {signed!r}")
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: x must be a real float array, got {type(x).__name__}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{caller}: x must be a real float array, got dtype {x.dtype}")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"{caller}: x must have at least one dimension and one element, got shape "
                         f"{x.shape}")
    if random_bits is not None:
        random_bits = jnp.asarray(random_bits)
        if random_bits.dtype != jnp.uint32:
            raise TypeError(f"{caller}: random_bits must be uint32, got {random_bits.dtype}")
        if random_bits.shape != x.shape:
            raise ValueError(f"{caller}: random_bits must have x's shape {x.shape}, got "
                             f"{random_bits.shape}")
    fmt = canonical.format(x.shape, bool(signed))
    like = jax.eval_shape(lambda: fmt.zeros(jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                            canonical.block_size, bool(signed)))
    return _encode(like, x, random_bits)


@jax.jit
def _encode(like, x, random_bits):
    noise = None
    if random_bits is not None:
        noise = random_bits & np.uint32(0xFFFF) if like.signed else random_bits >> np.uint32(16)
    return like.encode(x.astype(jnp.float32), noise)


def dequantize(q: Quantized, dtype: Any = jnp.float32) -> jax.Array:
    """Decodes a quantized moment.

    Args:
      q: An :class:`adamx.Int8Blocks`, :class:`adamx.Int4Blocks` or :class:`adamx.Int4Rank1`.
      dtype: The dtype of the result (the decoding runs in float32).

    Returns:
      The array ``q`` stands for: its shape is read from ``q``'s arrays.

    Raises:
      TypeError: If ``q`` is not a quantized moment, or ``dtype`` not a float dtype.
      ValueError: If ``q``'s arrays do not fit together (their dtypes and shapes).

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
    caller = "adamx.dequantize"
    if not _formats.is_quantized(q):
        raise TypeError(f"{caller}: q must be an Int8Blocks, Int4Blocks or Int4Rank1, got "
                        f"{type(q).__name__}")
    for field, a in zip(q._fields, q):
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            raise TypeError(f"{caller}: q.{field} must be an array, got {type(a).__name__}")
    q.check(caller, "q", q.leaf_shape)
    try:
        resolved = jnp.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"{caller}: dtype must be a real float dtype, got {dtype!r}")
    return _decode(q, resolved)


@functools.partial(jax.jit, static_argnums=1)
def _decode(q, dtype):
    return q.decode(dtype)


def dequantize_state(state: Any) -> Any:
    """The same state with every quantized moment decoded to float32; other leaves unchanged.

    Tree utilities such as ``optax.tree.norm`` would read a quantized moment's raw codes and
    scales; apply them to ``dequantize_state(state)``.

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
    return jax.tree.map(lambda x: x.decode() if _formats.is_quantized(x) else x, state,
                        is_leaf=_formats.is_quantized)
