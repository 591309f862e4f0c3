"""How a moment leaf is stored: the one place that knows the storage formats.

A moment leaf is an array in its storage dtype; or, for the specs ``"int8"`` and ``"int4"``
(:func:`adamx.int8_moments`, :func:`adamx.int4_moments`), a quantized node (:class:`adamx.Int8Blocks`,
:class:`adamx.Int4Blocks` or :class:`adamx.Int4Rank1`: a signed code for the first moment, an
unsigned one for the second), or a float32 array for leaves below the spec's ``min_size``; or None
for a param that is not trained (an integer or boolean leaf). The update
decodes a moment with :func:`load` into the compute dtype, does the math, and encodes the result
with :func:`store`, so the math never sees the storage format and the state's dtypes never change
across steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _formats, _quantize
from adamx._numerics import complex_dtype, compute_dtype, random_bits

_ACCEPTED = {
    "mu_dtype": 'None, float16, bfloat16, float32, float64, complex64, complex128, "int8" or "int4"',
    "nu_dtype": 'None, float16, bfloat16, float32, float64, "int8" or "int4"',
}


def check_spec(fn, name, spec):
    """Validates a moment storage spec (``name`` is "mu_dtype" or "nu_dtype"); returns it canonical.

    Accepted: None, a float dtype of at least 16 bits (the first moment may also be complex),
    the strings ``"int8"`` and ``"int4"`` (canonicalized to ``adamx.int8_moments()`` and
    ``adamx.int4_moments()``) or an :class:`adamx.Int8Spec` / :class:`adamx.Int4Spec`. 8-bit float
    dtypes are refused: without a per-block scale they underflow and stall (use ``"int8"``, which
    keeps one).

    Raises:
      ValueError: If ``spec`` is none of these.
    """
    if spec is None or isinstance(spec, (_quantize.Int8Spec, _quantize.Int4Spec)):
        return spec
    if isinstance(spec, str) and spec in ("int8", "int4"):
        return _quantize.int8_moments() if spec == "int8" else _quantize.int4_moments()
    try:
        dtype = jnp.dtype(spec)
    except TypeError:
        dtype = None
    allowed = (jnp.floating,) if name == "nu_dtype" else (jnp.floating, jnp.complexfloating)
    if dtype is None or not any(jnp.issubdtype(dtype, kind) for kind in allowed) or (
            jnp.finfo(dtype).bits < 16):
        shown = f'"{spec}"' if isinstance(spec, str) else repr(spec)
        raise ValueError(f"{fn}: {name} must be one of {_ACCEPTED[name]}, got {shown}")
    return dtype


def trained(leaf):
    """Whether a param or grad leaf is trained: float or complex. Integer and boolean params (and
    the float0 gradients ``jax.grad(..., allow_int=True)`` gives them) keep no moments."""
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def zeros(param, spec, *, real):
    """A zero moment for ``param``, built with ``zeros_like`` so it follows the param's sharding.

    Args:
      param: An array, scalar or ``jax.ShapeDtypeStruct``.
      spec: A canonical spec from :func:`check_spec`; None keeps the param's dtype (float32 for
        the second moment of a float16 or bfloat16 param).
      real: Whether the moment is real even for a complex param (the second moment is). Under
        an int8 or int4 spec it also picks the unsigned code (the second moment is never negative).

    Returns:
      The stored zero moment, or None for an integer or boolean param (not trained).

    Raises:
      TypeError: For a quantized first moment of a complex param.
    """
    if not trained(param):
        return None
    param_dtype = jnp.result_type(param)
    if isinstance(spec, (_quantize.Int8Spec, _quantize.Int4Spec)):
        if not real and jnp.issubdtype(param_dtype, jnp.complexfloating):
            bits = 8 if isinstance(spec, _quantize.Int8Spec) else 4
            raise TypeError(
                f'adamx: an int{bits} first moment needs real params, got a {param_dtype} leaf of '
                f"shape {tuple(np.shape(param))}; keep mu_dtype a float dtype for complex params"
            )
        return _quantize.zeros(param, spec, signed=not real)
    dtype = param_dtype if spec is None else spec
    if spec is None and real and param_dtype in (jnp.float16, jnp.bfloat16):
        # A 16-bit second moment fails: (1-b2) g^2 underflows in float16 for |g| < 1e-3, and in
        # bfloat16 a 0.999 decay is below half an ulp, so v never decays. Default to float32.
        dtype = jnp.dtype(jnp.float32)
    if real and jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    elif spec is not None and not real and jnp.issubdtype(param_dtype, jnp.complexfloating):
        # A complex first moment keeps its imaginary part: the smallest complex dtype that holds
        # the spec (bfloat16, float16 or float32 -> complex64; float64 -> complex128).
        dtype = complex_dtype(compute_dtype(dtype))
    return jnp.zeros_like(param, dtype=dtype)


def load(moment, dtype, shape):
    """Decodes a stored moment into ``dtype`` (a real one takes the real part) and ``shape``."""
    del shape  # every format here knows its own shape
    if _formats.is_quantized(moment):
        return _formats.decode(moment, dtype)
    if jnp.iscomplexobj(moment) and not jnp.issubdtype(dtype, jnp.complexfloating):
        moment = moment.real
    return moment.astype(dtype)


# Random bits of quantized moments: streams disjoint from those of the params' rounding (the leaf's
# index k), so that a param and its moments never round on the same draw.
_MOMENT_STREAMS = 0x80000000


def store(value, moment, rng=None):
    """Encodes ``value`` in the storage format of ``moment``.

    Args:
      value: The moment's new value, in the compute dtype and the leaf's shape.
      moment: The stored moment it replaces (its format is kept).
      rng: ``(seed, count, stream)``: a quantized moment rounds stochastically on random bits of
        (seed, count, stream, element), the same for a leaf's ``mu``, ``nu`` and ``nu_max`` (they
        take different bits of each draw); None rounds to nearest, which stalls a slowly moving
        second moment (see ``adamx/_codes.py``). Float moments ignore it.
    """
    if _formats.is_quantized(moment):
        bits = None
        if rng is not None:
            seed, count, stream = rng
            bits = random_bits(np.shape(value), seed=seed, count=count,
                               stream=_MOMENT_STREAMS | stream, sharding=jax.typeof(value).sharding)
        return _formats.encode(value, moment, bits)
    return value.astype(moment.dtype)


def as_stored(value, moment):
    """The value of a moment the step uses: as the state holds it, where that is a narrower float.

    Reading a bfloat16 or float16 moment back from the state after storing it lets XLA update it
    in place and read it once more for the step; the unrounded value would be recomputed from a
    copy of the old moment (2.2x the float32 step's time on one 16M leaf, against 0.8x). A
    quantized moment is read unrounded: decoding it again costs more than it saves.
    """
    if _formats.is_quantized(moment):
        return value
    if jnp.iscomplexobj(moment) and not jnp.iscomplexobj(value):
        moment = moment.real  # a complex mu_dtype for a real param
    return moment.astype(value.dtype)


def check_leaf(fn, where, moment, grad):
    """Raises ValueError (naming ``where``) if a stored moment cannot be the moment of ``grad``.

    ``where`` names the leaf, e.g. ``state.nu['w']``. A trained grad needs a moment of its shape
    (an inexact array, or a quantized node); an untrained one (integer or float0) needs None.
    """
    if not trained(grad):
        if moment is not None:
            raise ValueError(f"{fn}: {where} must be None for an integer or float0 gradient (an "
                             f"untrained leaf keeps no moment), got {_what(moment)}")
        return
    if _formats.is_quantized(moment):
        _quantize.check(fn, where, moment, np.shape(grad))
        return
    dtype = getattr(moment, "dtype", None)
    shape = getattr(moment, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"{fn}: {where} must be a float array for a float gradient, got "
                         f"{_what(moment)}")
    if tuple(shape) != tuple(np.shape(grad)):
        raise ValueError(f"{fn}: {where} has shape {tuple(shape)} where the grads have "
                         f"{tuple(np.shape(grad))}")


def _what(x):
    """A short description for messages: ``float32[3]`` for an array or tracer, else the type."""
    dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
    if dtype is None or shape is None:
        return "None" if x is None else type(x).__name__
    return f"{dtype}{list(shape)}"


def nbytes(tree):
    """Bytes held by the arrays of ``tree`` (for example an ``AdamState``)."""
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
