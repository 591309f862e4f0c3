"""How a moment leaf is stored: the one place that knows the storage formats.

A moment leaf is an array in its storage dtype. The update decodes it with :func:`load` into the
compute dtype, does the math, and encodes the result with :func:`store`, so the math never sees
the storage format and the state's dtypes never change across steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from adamx._numerics import complex_dtype, compute_dtype


def check_spec(fn, name, spec):
    """Validates a moment storage spec (None or a floating dtype) and returns it canonicalized.

    Raises:
      ValueError: If ``spec`` names no floating dtype.
    """
    if spec is None:
        return None
    try:
        dtype = jnp.dtype(spec)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be None or a float dtype, got {spec!r}")
    return dtype


def zeros(param, spec, *, real):
    """A zero moment for ``param``, built with ``zeros_like`` so it follows the param's sharding.

    Args:
      param: An array or ``jax.ShapeDtypeStruct``.
      spec: A canonical spec from :func:`check_spec`; None keeps the param's dtype.
      real: Whether the moment is real even for a complex param (the second moment is).
    """
    dtype = param.dtype if spec is None else spec
    if real and jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    elif not real and jnp.issubdtype(param.dtype, jnp.complexfloating):
        # A complex first moment keeps its imaginary part: the smallest complex dtype that holds
        # the spec (bfloat16, float16 or float32 -> complex64; float64 -> complex128).
        dtype = complex_dtype(compute_dtype(dtype))
    return jnp.zeros_like(param, dtype=dtype)


def load(moment, dtype):
    """Decodes a stored moment into ``dtype`` for the math."""
    return moment.astype(dtype)


def store(value, moment):
    """Encodes ``value`` in the storage format of ``moment``."""
    return value.astype(moment.dtype)


def is_moment_leaf(x):
    """Marks a stored moment as one leaf when flattening a moment tree."""
    return isinstance(x, (jax.Array, np.ndarray))


def nbytes(tree):
    """Bytes held by the arrays of ``tree`` (for example an ``AdamState``)."""
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
