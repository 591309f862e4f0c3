"""How a moment leaf is stored: a float array in its storage dtype, a quantized moment
(``adamx/_formats.py``), or None for a param that is not trained (an integer or boolean leaf).

The update decodes a moment with :func:`load` into the compute dtype, does the math, and encodes
the result with :func:`store` into the format it had, so the math never sees the storage format
and the state's dtypes never change across steps.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _quantize
from adamx._checks import short
from adamx._formats import is_quantized
from adamx._numerics import complex_dtype, compute_dtype, stochastic_round

Spec = Any  # None (the params' dtypes), a float or complex dtype, or an Int8Spec/Int4Spec

_ACCEPTED = {
    "mu_dtype": 'None, float16, bfloat16, float32, float64, complex64, complex128, "int8" or "int4"',
    "nu_dtype": 'None, bfloat16, float32, float64, "int8" or "int4"',
}


def check_spec(caller: str, name: str, spec: Any) -> Spec:
    """Validates a moment storage spec (``name`` is "mu_dtype" or "nu_dtype"); returns it canonical:
    None, a NumPy dtype, or an ``Int8Spec``/``Int4Spec`` (for ``"int8"``/``"int4"`` too).

    8-bit float dtypes are refused (without a per-block scale they underflow and stall; use
    ``"int8"``), and so is a float16 second moment: ``(1 - b2) g**2`` underflows to 0 for
    ``|g| < 8e-3``, and the next step divides by ``eps``.

    Raises:
      ValueError: If ``spec`` is none of the accepted ones.
    """
    quantized = _quantize.as_spec(spec)
    if quantized is not None or spec is None:
        return quantized
    try:  # a dtype, its name or its scalar type; not an array (nor a per-leaf tree, unsupported)
        dtype = jnp.dtype(spec) if isinstance(spec, (str, type, np.dtype)) else None
    except (TypeError, ValueError):
        dtype = None
    allowed = (jnp.floating,) if name == "nu_dtype" else (jnp.floating, jnp.complexfloating)
    if (dtype is None or not any(jnp.issubdtype(dtype, kind) for kind in allowed)
            or jnp.finfo(dtype).bits < 16 or (name == "nu_dtype" and dtype == jnp.float16)):
        shown = f'"{spec}"' if isinstance(spec, str) else dtype.name if dtype is not None else (
            short(spec))
        hint = ""
        if dtype == jnp.float16 and name == "nu_dtype":
            hint = (" (a float16 second moment underflows to 0 for gradients below 8e-3, and the "
                    "step then divides by eps: use bfloat16, float32 or \"int8\")")
        raise ValueError(f"{caller}: {name} must be one of {_ACCEPTED[name]}, got {shown}{hint}")
    return dtype


def has_moments(leaf: Any) -> bool:
    """Whether a param or grad leaf is trained: float or complex. Integer and boolean params (and
    the float0 gradients ``jax.grad(..., allow_int=True)`` gives them) keep no moments."""
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def zeros(param: Any, spec: Spec, *, second: bool) -> Any:
    """A zero moment for ``param``, built with ``zeros_like`` so it follows the param's sharding.

    Args:
      param: An array, scalar or ``jax.ShapeDtypeStruct``.
      spec: A canonical spec from :func:`check_spec`. None keeps the param's dtype (float32 for
        the second moment of a float16 or bfloat16 param).
      second: The second moment: real even for a complex param, and an unsigned code when
        quantized.

    Returns:
      The stored zero moment, or None for an integer or boolean param (not trained).

    Raises:
      TypeError: For a quantized first moment of a complex param.
    """
    if not has_moments(param):
        return None
    param_dtype = jnp.result_type(param)
    if isinstance(spec, _quantize.Spec.__args__):
        _check_static(np.shape(param))
        if not second and jnp.issubdtype(param_dtype, jnp.complexfloating):
            bits = 8 if isinstance(spec, _quantize.Int8Spec) else 4
            raise TypeError(
                f"adamx: an int{bits} first moment needs real params, got a {param_dtype} leaf of "
                f"shape {tuple(np.shape(param))}; keep mu_dtype a float dtype for complex params")
        return spec.zeros(param, signed=not second)
    dtype = param_dtype if spec is None else spec
    if spec is None and second and param_dtype in (jnp.float16, jnp.bfloat16):
        # A 16-bit second moment fails: (1-b2) g^2 underflows in float16 for |g| < 8e-3, and in
        # bfloat16 a 0.999 decay is below half an ulp, so v never decays. Default to float32.
        dtype = jnp.dtype(jnp.float32)
    if second and jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    elif spec is not None and not second and jnp.issubdtype(param_dtype, jnp.complexfloating):
        # A complex first moment keeps its imaginary part: the smallest complex dtype that holds
        # the spec (bfloat16, float16 or float32 -> complex64; float64 -> complex128).
        dtype = complex_dtype(compute_dtype(dtype))
    return jnp.zeros_like(param, dtype=dtype)


def _check_static(shape: tuple) -> None:
    """Quantized moments cut a leaf into blocks by its size: a symbolic dimension (jax.export's
    shape polymorphism) leaves that undecided."""
    if not all(isinstance(d, (int, np.integer)) for d in shape):
        raise TypeError(f"adamx: 8- and 4-bit moments need leaves of static shape, got {shape} (a "
                        "symbolic dimension): keep mu_dtype and nu_dtype float dtypes to export "
                        "shape-polymorphically")


def load(moment: Any, dtype: Any) -> jax.Array:
    """Decodes a stored moment into ``dtype`` (a real ``dtype`` takes a complex moment's real part)."""
    if is_quantized(moment):
        return moment.decode(dtype)
    if jnp.iscomplexobj(moment) and not jnp.issubdtype(dtype, jnp.complexfloating):
        moment = moment.real
    return moment.astype(dtype)


def rounds_stochastically(moment: Any, second: bool) -> bool:
    """Whether a stored moment rounds stochastically: a quantized one, and a bfloat16 second
    moment, whose decay at ``b2 = 0.999`` is below half its ulp (rounded to nearest, it would
    stop decaying at about a third of ``g**2``)."""
    return is_quantized(moment) or (second and getattr(moment, "dtype", None) == jnp.bfloat16)


def store(value: jax.Array, moment: Any, noise: Optional[jax.Array], *, second: bool) -> Any:
    """``value`` (the compute dtype, the leaf's shape) in the storage format of ``moment``.

    ``noise``: 16 random bits per element (uint32 below 2**16) with which a moment that
    :func:`rounds_stochastically` rounds; other float moments round to nearest.
    """
    if is_quantized(moment):
        return moment.encode(value.astype(jnp.float32), noise)
    if rounds_stochastically(moment, second):
        return stochastic_round(value, noise << np.uint32(16), jnp.bfloat16)
    return value.astype(moment.dtype)


def as_stored(value: jax.Array, moment: Any, *, second: bool = False) -> jax.Array:
    """The value of a moment the step uses: as the state holds it, where that is a narrower float
    rounded to nearest.

    Reading a bfloat16 or float16 moment back from the state after storing it lets XLA update it
    in place and read it once more; the unrounded value would be recomputed from a copy of the
    old moment. A moment that :func:`rounds_stochastically` is used unrounded: decoding it again,
    or using the stochastically rounded value in two outputs, costs more than the copy.
    """
    if rounds_stochastically(moment, second):
        return value
    if jnp.iscomplexobj(moment) and not jnp.iscomplexobj(value):
        moment = moment.real  # a complex mu_dtype for a real param
    return moment.astype(value.dtype)


def check_leaf(caller: str, where: str, moment: Any, grad: Any, spec: Any = "any", *,
               second: bool) -> None:
    """Raises ValueError (naming ``where``, e.g. ``state.nu['w']``) unless ``moment`` can be the
    stored moment of ``grad``, and, where ``spec`` is given, the one that ``spec`` builds.

    A trained grad needs a moment of its shape (an inexact array, or a quantized node; never a
    float16 second moment); an untrained one (integer or float0) needs None. ``spec="any"`` (the
    functional API, which has no spec) checks no more. A factory's spec must match exactly,
    except None, under which a moment may have any float dtype (the params' own) but no
    quantized format.
    """
    if not has_moments(grad):
        if moment is not None:
            raise ValueError(f"{caller}: {where} must be None for an integer or float0 gradient (an "
                             f"untrained leaf keeps no moment), got {short(moment)}")
        return
    shape = tuple(np.shape(grad))
    if is_quantized(moment):
        moment.check(caller, where, shape)
        if moment.signed == second:  # an unsigned first moment would store every negative as 0
            kind, want = ("second", "unsigned") if second else ("first", "signed")
            raise ValueError(f"{caller}: {where} is an {type(moment).__name__} of "
                             f"{'signed' if moment.signed else 'unsigned'} codes, but a {kind} "
                             f"moment needs {want} ones (are mu and nu swapped?)")
    else:
        dtype = getattr(moment, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"{caller}: {where} must be a float array for a float gradient, got "
                             f"{short(moment)}")
        if tuple(moment.shape) != shape:
            raise ValueError(f"{caller}: {where} has shape {tuple(moment.shape)} where the grads have "
                             f"{shape}")
        if second and jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(f"{caller}: {where} must be real, got {dtype}")
        if second and dtype == jnp.float16:
            raise ValueError(f"{caller}: {where} is float16, where (1 - b2) g**2 underflows to 0 for "
                             "gradients below 8e-3 and the step then divides by eps; keep the "
                             "second moment in bfloat16, float32 or \"int8\"")
    if isinstance(spec, str):
        return
    want = jax.eval_shape(lambda: zeros(jax.ShapeDtypeStruct(shape, jnp.result_type(grad)), spec,
                                        second=second))
    if spec is None:
        fits = not is_quantized(moment)
    else:
        fits = jax.tree.structure(moment) == jax.tree.structure(want) and all(
            (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype)
            for a, b in zip(jax.tree.leaves(moment), jax.tree.leaves(want)))
    if not fits:
        name = "nu_dtype" if second else "mu_dtype"
        raise ValueError(
            f"{caller}: {where} is {described(moment)}, but this transformation keeps {name}="
            f"{_spec_name(spec)}, which stores {described(want)} there; build the state with its "
            "init, or convert the one you have (adamx.dequantize_state decodes quantized moments; "
            "jax.tree.map(lambda x: x.astype(dtype), state.mu) casts float ones)")


def described(moment: Any) -> str:
    """``an Int8Blocks`` for a quantized moment, ``a float32[3]`` for an array."""
    if is_quantized(moment):
        return f"an {type(moment).__name__}"
    return f"a {short(moment)}"


def _spec_name(spec):
    if spec is None or isinstance(spec, _quantize.Spec.__args__):
        return repr(spec)
    return jnp.dtype(spec).name
