"""The quantized storage formats of a moment, one class each, owning everything about the format:
its zeros, its validation, the shape it stands for, its ZeRO-1 sharding unit, encode and decode.

A quantized moment is a NamedTuple of arrays, so ``flax.serialization``, orbax, ``lax.scan``,
``optax.MultiSteps`` and ``jax.export`` carry it like any other pytree node. Its arrays say its
format: the class, and the code's signedness by the codes' dtype (int8 for a first moment,
uint8 for a second). The element codes are in ``adamx/_codes.py``.

Blocks cut the leaf, flattened in row-major order, into blocks of ``B`` elements (a power of
two; the last block may be short) that share one scale, each block's largest magnitude. From
the number of blocks ``n`` of a ``size``-element leaf, ``B`` is the power of two at or above
``ceil(size / n)`` (with one block, any ``B >= size`` decodes alike).

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
  ICLR 2022, https://arxiv.org/abs/2110.02861
  Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
  https://arxiv.org/abs/2309.01507
"""

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.export  # jax < 0.8 does not import it with jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adamx import _codes

_F32_MAX = np.float32(np.finfo(np.float32).max)


# ---- shared by the formats ---------------------------------------------------------------------

def block_length(size: int, blocks: int) -> int:
    """The block size of a ``size``-element leaf stored in ``blocks`` blocks."""
    if blocks <= 1:
        return max(size, 1)
    return 1 << (-(-size // blocks) - 1).bit_length()


def _to_blocks(flat, length):
    """``flat`` zero-padded to whole blocks, shape ``(blocks, length)``."""
    pad = -flat.shape[0] % length
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(-1, length)


def _from_blocks(blocks, shape):
    """The leaf of ``shape`` from its ``(blocks, length)`` values (the padding dropped)."""
    size = math.prod(shape)
    flat = blocks.reshape(-1)
    return (flat[:size] if flat.shape[0] != size else flat).reshape(shape)


def _packed(shape):
    """The shape of 4-bit codes of a leaf: two per byte along the last axis, padded to even."""
    return tuple(shape[:-1]) + ((shape[-1] + 1) // 2,)


def _pack(codes, signed):
    """4-bit codes (int32) of a leaf packed along its last axis, padded to even with code 0."""
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    return _codes.pack(codes, signed=signed)


def _unpack(packed, cols):
    """The int32 codes of a leaf whose last axis has ``cols`` elements."""
    codes = _codes.unpack(packed)
    return codes[..., :cols] if codes.shape[-1] != cols else codes


def _placed_zeros(param, shape, dtype, entries=lambda spec: spec):
    """Zeros of ``shape`` placed as ``param``: its partition spec, mapped by ``entries`` (a function
    of the spec padded to the param's rank), where each dimension still divides."""
    sharding = jax.typeof(param).sharding if isinstance(param, jax.core.Tracer) else (
        getattr(param, "sharding", None))
    if getattr(param, "_committed", True) is False or not isinstance(sharding, NamedSharding):
        return jnp.zeros(shape, dtype)
    spec = list(sharding.spec) + [None] * (len(np.shape(param)) - len(sharding.spec))
    spec = [e if e is None or shape[d] % _axis_size(sharding.mesh, e) == 0 else None
            for d, e in enumerate(entries(spec))]
    return jax.lax.full(shape, 0, dtype, sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def _axis_size(mesh, entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


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
    return list(sharding.spec) + [None] * (x.ndim - len(sharding.spec)) if used & explicit else None


def _auto(run, like, *outs):
    """``run`` under ``auto_axes`` when ``like`` is explicitly sharded; ``outs`` map its spec to
    the specs of run's outputs."""
    spec = _explicit_spec(like)
    if spec is None:
        return run
    specs = tuple(PartitionSpec(*out(spec)) for out in outs)
    return jax.sharding.auto_axes(run, out_sharding=specs if len(specs) > 1 else specs[0])


def _check_arrays(caller, where, moment, dtypes):
    """Each field an array of its allowed dtypes (a tuple of names per field)."""
    for field, allowed in zip(moment._fields, dtypes):
        a = getattr(moment, field)
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            raise ValueError(f"{caller}: {where}.{field} must be an array, got {type(a).__name__}")
        if str(jnp.dtype(a.dtype)) not in allowed:
            raise ValueError(f"{caller}: {where}.{field} of an {type(moment).__name__} must be "
                             f"{' or '.join(allowed)}, got {a.dtype}")


def _check_shape(caller, where, field, got, want, leaf):
    if tuple(got) != tuple(want):
        raise ValueError(f"{caller}: {where}.{field} has shape {tuple(got)}, but a grads' leaf of "
                         f"shape {tuple(leaf)} needs {tuple(want)}")


def _block_spec(moment, shape, mesh, axis, base):
    """ZeRO-1 of block formats: codes and scales split along their leading dimension together,
    only where each device then holds whole blocks (decoding needs no neighbour's data); None
    where they cannot."""
    specs = {f: list(base[f]) for f in moment._fields}
    rows, n = moment.codes.shape[0] if moment.codes.ndim else 0, mesh.shape[axis]
    size, blocks = math.prod(shape), moment.absmax.shape[0]
    if (any(any(s) for s in specs.values()) or not rows or rows % n or blocks % n
            or (size // n) % block_length(size, blocks)):
        return None
    specs["codes"][0] = specs["absmax"][0] = axis
    return specs


# ---- the formats ------------------------------------------------------------------------------

_SIGNED8, _UNSIGNED8 = (3, 127), (4, 255)  # (mantissa bits, top code) of the 8-bit log codes


class Int8Blocks(NamedTuple):
    """A moment in 8-bit blocks: a log code per element and a float32 scale per block.

    ``n + 4 ceil(n / B)`` bytes for ``n`` elements: 1.016 per element for B = 256.

    Attributes:
      codes: int8 (signed log code, a first moment) or uint8 (unsigned, a second moment), the
        leaf's shape, so they follow the param's sharding.
      absmax: float32, each block's largest magnitude: shape ``(ceil(size / B),)``.
    """

    codes: jax.Array
    absmax: jax.Array

    @property
    def leaf_shape(self) -> tuple:
        """The shape of the leaf this moment stands for."""
        return tuple(self.codes.shape)

    @property
    def signed(self) -> bool:
        return jnp.dtype(self.codes.dtype) == jnp.int8

    @classmethod
    def zeros(cls, param: Any, block_size: int, signed: bool) -> "Int8Blocks":
        shape = tuple(np.shape(param))
        return cls(_placed_zeros(param, shape, jnp.int8 if signed else jnp.uint8),
                   jnp.zeros((-(-math.prod(shape) // block_size),), jnp.float32))

    def encode(self, x: jax.Array, noise: Optional[jax.Array]) -> "Int8Blocks":
        """``x`` (the leaf's shape, float32) in this format; ``noise``: 16 random bits per element
        (uint32 below 2**16) to round stochastically, or None to round to nearest."""
        signed, shape = self.signed, self.leaf_shape

        def run(x, noise):
            length = block_length(x.size, self.absmax.shape[0])
            values = _to_blocks(x.reshape(-1), length)
            if not signed:
                values = jnp.minimum(values, _F32_MAX)  # an overflowed square saturates
            absmax = _codes.live_scale(_codes.peak(values, axis=1))
            scaled = values * _codes.reciprocal(absmax)[:, None]
            if noise is not None:
                noise = _to_blocks(noise.reshape(-1), length)
            mantissa, top = _SIGNED8 if signed else _UNSIGNED8
            codes = _codes.log_encode(scaled, mantissa=mantissa, top=top, signed=signed,
                                      noise=noise, positive=None if signed else values > 0)
            codes = _from_blocks(codes.astype(jnp.int8 if signed else jnp.uint8), shape)
            return codes, absmax

        return Int8Blocks(*_auto(run, x, lambda s: s, lambda s: [None])(x, noise))

    def decode(self, dtype: Any = jnp.float32) -> jax.Array:
        def run(codes, absmax):
            length = block_length(math.prod(self.leaf_shape), absmax.shape[0])
            mantissa, top = _SIGNED8 if self.signed else _UNSIGNED8
            values = _codes.log_decode(_to_blocks(codes.reshape(-1), length), mantissa=mantissa,
                                       top=top)
            return _from_blocks(values * absmax[:, None], self.leaf_shape)

        return _auto(run, self.codes, lambda s: s)(*self).astype(dtype)

    def check(self, caller: str, where: str, shape: tuple) -> None:
        """Raises ValueError (naming ``where``) unless this can stand for a leaf of ``shape``."""
        _check_arrays(caller, where, self, [("int8", "uint8"), ("float32",)])
        _check_shape(caller, where, "codes", self.codes.shape, shape, shape)
        _check_blocks(caller, where, self.absmax, shape)

    def zero1_specs(self, mesh, axis, base) -> Optional[dict]:
        """The partition specs of its arrays split over ``axis`` as one unit (from their ``base``
        specs), or None where it cannot split."""
        return _block_spec(self, self.leaf_shape, mesh, axis, base)


class Int4Blocks(NamedTuple):
    """A first moment in 4-bit blocks: a square code per element (two per byte along the last
    axis, which must be even) and a bfloat16 scale per block, rounded up (so still at least every
    magnitude in it). 0.5625 bytes per element for B = 32.

    Attributes:
      codes: int8, shape ``leaf.shape[:-1] + (leaf.shape[-1] // 2,)``.
      absmax: bfloat16, each block's largest magnitude rounded up: ``(ceil(size / B),)``.
    """

    codes: jax.Array
    absmax: jax.Array

    @property
    def leaf_shape(self) -> tuple:
        return tuple(self.codes.shape[:-1]) + (2 * self.codes.shape[-1],)

    signed = True

    @classmethod
    def zeros(cls, param: Any, block_size: int, signed: bool = True) -> "Int4Blocks":
        shape = tuple(np.shape(param))
        return cls(_placed_zeros(param, _packed(shape), jnp.int8),
                   jnp.zeros((-(-math.prod(shape) // block_size),), jnp.bfloat16))

    def encode(self, x, noise):
        def run(x, noise):
            length = block_length(x.size, self.absmax.shape[0])
            values = _to_blocks(x.reshape(-1), length)
            absmax = _codes.bfloat16_up(_codes.live_scale(_codes.peak(values, axis=1)))
            scaled = values * _codes.reciprocal(absmax)[:, None]
            if noise is not None:
                noise = _to_blocks(noise.reshape(-1), length)
            codes = _from_blocks(_codes.square_encode(scaled, noise=noise), x.shape)
            return _pack(codes, signed=True), absmax.astype(jnp.bfloat16)

        packed = lambda s: s[:-1] + [None]  # noqa: E731 - the halved last axis is not sharded
        return Int4Blocks(*_auto(run, x, packed, lambda s: [None])(x, noise))

    def decode(self, dtype=jnp.float32):
        shape = self.leaf_shape

        def run(codes, absmax):
            length = block_length(math.prod(shape), absmax.shape[0])
            values = _codes.square_decode(_unpack(codes, shape[-1]))
            values = _to_blocks(values.reshape(-1), length) * absmax.astype(jnp.float32)[:, None]
            return _from_blocks(values, shape)

        packed = lambda s: s[:-1] + [None]  # noqa: E731
        return _auto(run, self.codes, packed)(*self).astype(dtype)

    def check(self, caller, where, shape):
        _check_arrays(caller, where, self, [("int8",), ("bfloat16",)])
        if not shape or shape[-1] % 2:
            raise ValueError(f"{caller}: {where} is an Int4Blocks, which cannot hold a grads' leaf of "
                             f"shape {tuple(shape)} (its last dimension must be even)")
        _check_shape(caller, where, "codes", self.codes.shape, _packed(shape), shape)
        _check_blocks(caller, where, self.absmax, shape)

    def zero1_specs(self, mesh, axis, base):
        return _block_spec(self, self.leaf_shape, mesh, axis, base)


class Int4Rank1(NamedTuple):
    """A second moment in 4 bits under rank-1 normalization (Li et al. 2023).

    The leaf is seen as rows (all leading axes) by columns (the last axis): element ``(i, j)`` is
    scaled by ``min(row_max[i], col_max[j])`` and stored in the linear code ``(k + 1) / 16``,
    two per byte along the last axis (padded to even). 0.5 bytes per element, and a float32 per
    row and per column.

    Attributes:
      codes: uint8, shape ``leaf.shape[:-1] + (ceil(leaf.shape[-1] / 2),)``.
      row_max: float32, the largest value of each row: shape ``leaf.shape[:-1]``.
      col_max: float32, the largest value of each column: shape ``(leaf.shape[-1],)``.
    """

    codes: jax.Array
    row_max: jax.Array
    col_max: jax.Array

    @property
    def leaf_shape(self) -> tuple:
        return tuple(self.row_max.shape) + tuple(self.col_max.shape)

    signed = False

    @staticmethod
    def fits(shape: tuple) -> bool:
        """Whether rank-1 suits a leaf: rows and columns of at least 2, and together no more than
        1/32 of its size (the scales then cost at most 1/8 byte per element)."""
        rows, cols = math.prod(shape[:-1]), shape[-1] if shape else 0
        return len(shape) >= 2 and rows >= 2 and cols >= 2 and 32 * (rows + cols) <= rows * cols

    @classmethod
    def zeros(cls, param: Any, block_size: Any = None, signed: bool = False) -> "Int4Rank1":
        shape = tuple(np.shape(param))
        return cls(_placed_zeros(param, _packed(shape), jnp.uint8),
                   _placed_zeros(param, shape[:-1], jnp.float32, lambda s: s[:-1]),
                   jnp.zeros(shape[-1:], jnp.float32))

    def encode(self, x, noise):
        shape = x.shape

        def run(x, noise):
            values = jnp.minimum(x.reshape(-1, shape[-1]), _F32_MAX)
            row_max = _codes.live_scale(_codes.peak(values, axis=1))
            col_max = _codes.live_scale(_codes.peak(values, axis=0))
            # 1 / min(r, c) = max(1 / r, 1 / c) exactly: a division per row and column only
            scaled = values * jnp.maximum(_codes.reciprocal(row_max)[:, None],
                                          _codes.reciprocal(col_max)[None, :])
            if noise is not None:
                noise = noise.reshape(values.shape)
            codes = _codes.linear_encode(scaled, noise=noise).reshape(shape)
            return _pack(codes, signed=False), row_max.reshape(shape[:-1]), col_max

        specs = (lambda s: s[:-1] + [None], lambda s: s[:-1], lambda s: [s[-1]])
        return Int4Rank1(*_auto(run, x, *specs)(x, noise))

    def decode(self, dtype=jnp.float32):
        shape = self.leaf_shape

        def run(codes, row_max, col_max):
            values = _codes.linear_decode(_unpack(codes, shape[-1]).reshape(-1, shape[-1]))
            scale = jnp.minimum(row_max.reshape(-1, 1), col_max[None, :])
            return (values * scale).reshape(shape)

        return _auto(run, self.codes, lambda s: s[:-1] + [None])(*self).astype(dtype)

    def check(self, caller, where, shape):
        _check_arrays(caller, where, self, [("uint8",), ("float32",), ("float32",)])
        if len(shape) < 2:
            raise ValueError(f"{caller}: {where} is an Int4Rank1, which cannot hold a grads' leaf of "
                             f"shape {tuple(shape)} (it needs rows and columns)")
        _check_shape(caller, where, "codes", self.codes.shape, _packed(shape), shape)
        _check_shape(caller, where, "row_max", self.row_max.shape, shape[:-1], shape)
        _check_shape(caller, where, "col_max", self.col_max.shape, shape[-1:], shape)

    def zero1_specs(self, mesh, axis, base):
        """Codes and ``row_max`` split by rows; ``col_max`` stays whole (each step's new one is a
        maximum over all rows: one all-reduce of that small vector, which XLA inserts)."""
        specs = {f: list(base[f]) for f in self._fields}
        if any(any(s) for s in specs.values()) or self.codes.shape[0] % mesh.shape[axis]:
            return None
        specs["codes"][0] = specs["row_max"][0] = axis
        return specs


def _check_blocks(caller, where, absmax, shape):
    size = math.prod(shape)
    blocks = absmax.shape[0] if len(absmax.shape) == 1 else 0
    if blocks < 1 or -(-size // block_length(size, blocks)) != blocks:
        raise ValueError(f"{caller}: {where}.absmax has shape {tuple(absmax.shape)}, which is no "
                         f"number of power-of-two blocks of a grads' leaf of shape {tuple(shape)}")


FORMATS = (Int8Blocks, Int4Blocks, Int4Rank1)
Quantized = Union[Int8Blocks, Int4Blocks, Int4Rank1]

for _format in FORMATS:
    jax.export.register_namedtuple_serialization(_format, serialized_name=f"adamx.{_format.__name__}")


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized moment."""
    return isinstance(x, FORMATS)
