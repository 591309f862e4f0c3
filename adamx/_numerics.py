"""Small numerical helpers, each here because the obvious one-liner loses precision or wraps."""

import numbers

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

    The direct form loses the low bits of ``b**t`` when it is close to 1: in float32,
    ``1 - 0.999**t`` is off by up to 330 ulps. This form stays within 7 ulps of the float64 value
    for every t (measured for b in {0.5, 0.9, 0.999, 0.99999}, t <= 20000), is exactly ``1 - b``
    at t = 1 (so the first Adam step is exactly ``lr * sign(g)`` when eps is negligible), and is
    1 for b = 0.

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
