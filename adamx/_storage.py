"""How a moment leaf is stored: the one place that knows the storage formats.

A moment leaf is an array in its storage dtype, or, for the spec ``"int8"``
(:func:`adamx.int8_moments`), a block-wise 8-bit :class:`adamx.Quantized` node (signed code for the
first moment, unsigned for the second), or a float32 array for leaves below the spec's
``min_size``. The update decodes it with :func:`load` into the
compute dtype, does the math, and encodes the result with :func:`store`, so the math never sees
the storage format and the state's dtypes never change across steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _quantize
from adamx._numerics import complex_dtype, compute_dtype

_ACCEPTED = 'None, a float dtype, or "int8"'


def check_spec(fn, name, spec):
    """Validates a moment storage spec and returns it canonicalized.

    Accepted: None, a floating dtype, the string ``"int8"`` (canonicalized to
    ``adamx.int8_moments()``) or an :class:`adamx.Int8Spec`.

    Raises:
      ValueError: If ``spec`` is none of these.
    """
    if spec is None or isinstance(spec, _quantize.Int8Spec):
        return spec
    if isinstance(spec, str):
        if spec == "int8":
            return _quantize.int8_moments()
        shown = f'"{spec}"'
    else:
        shown = repr(spec)
    try:
        dtype = jnp.dtype(spec)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be one of {_ACCEPTED}, got {shown}")
    return dtype


def zeros(param, spec, *, real):
    """A zero moment for ``param``, built with ``zeros_like`` so it follows the param's sharding.

    Args:
      param: An array or ``jax.ShapeDtypeStruct``.
      spec: A canonical spec from :func:`check_spec`; None keeps the param's dtype (float32 for
        the second moment of a float16 or bfloat16 param).
      real: Whether the moment is real even for a complex param (the second moment is). Under
        an int8 spec it also picks the unsigned code (the second moment is never negative).

    Raises:
      TypeError: For an int8 first moment of a complex param.
    """
    if isinstance(spec, _quantize.Int8Spec):
        if not real and jnp.issubdtype(param.dtype, jnp.complexfloating):
            raise TypeError(
                f'adamx: an int8 first moment needs real params, got a {param.dtype} leaf of '
                f"shape {tuple(param.shape)}; keep mu_dtype a float dtype for complex params"
            )
        return _quantize.zeros(param, spec, signed=not real)
    param_dtype = jnp.result_type(param)
    dtype = param_dtype if spec is None else spec
    if spec is None and real and param_dtype in (jnp.float16, jnp.bfloat16):
        # A 16-bit second moment fails: (1-b2) g^2 underflows in float16 for |g| < 1e-3, and in
        # bfloat16 a 0.999 decay is below half an ulp, so v never decays. Default to float32.
        dtype = jnp.dtype(jnp.float32)
    if real and jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    elif not real and jnp.issubdtype(param_dtype, jnp.complexfloating):
        # A complex first moment keeps its imaginary part: the smallest complex dtype that holds
        # the spec (bfloat16, float16 or float32 -> complex64; float64 -> complex128).
        dtype = complex_dtype(compute_dtype(dtype))
    return jnp.zeros_like(param, dtype=dtype)


def load(moment, dtype):
    """Decodes a stored moment into ``dtype`` for the math."""
    if isinstance(moment, _quantize.Quantized):
        return _quantize.dequantize(moment, dtype)
    return moment.astype(dtype)


def store(value, moment):
    """Encodes ``value`` in the storage format of ``moment``."""
    if isinstance(moment, _quantize.Quantized):
        return _quantize.quantize(value, block_size=moment.block_size, signed=moment.signed)
    return value.astype(moment.dtype)


def is_moment_leaf(x):
    """Marks a stored moment as one leaf when flattening a moment tree."""
    return isinstance(x, (jax.Array, np.ndarray, _quantize.Quantized))


def nbytes(tree):
    """Bytes held by the arrays of ``tree`` (for example an ``AdamState``)."""
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
