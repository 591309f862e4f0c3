"""Argument checks whose messages name the call, the argument, the allowed range and the value.

Concrete values (Python numbers, NumPy values, concrete JAX arrays of any real dtype, bfloat16
included) are checked when a transformation is built or a pure function is called. Tracers are
not forced to a value; :func:`check_hyperparams` checks them in a step run under
``jax.experimental.checkify``.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# Concrete hyperparameters must be finite in float32, the narrowest dtype the math runs in:
# ``learning_rate=1e39`` is a finite float64 but an infinite step.
_F32_MAX = float(np.finfo(np.float32).max)


def is_traced(value):
    return isinstance(value, jax.core.Tracer)


def concrete_float(fn, name, value):
    """Returns ``value`` as a Python float, or None for a tracer; raises TypeError otherwise.

    A tracer's value is unknown, but its shape and dtype are not: they are checked too.
    """
    if is_traced(value):
        aval = jax.typeof(value)
        if aval.shape != () or not (jnp.issubdtype(aval.dtype, jnp.floating)
                                    or jnp.issubdtype(aval.dtype, jnp.integer)):
            raise TypeError(f"{fn}: {name} must be a real scalar, got a traced "
                            f"{aval.str_short()}")
        return None
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "shape", None) != () or not (
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {value!r}")
    return float(np.asarray(value, np.float64))


def _check_finite_f32(fn, name, value, x):
    if abs(x) > _F32_MAX:
        raise ValueError(f"{fn}: {name} must be finite in float32 (at most {_F32_MAX:.4g}), "
                         f"got {value!r}")


def check_in_unit_interval(fn, **values):
    """Checks that each value lies in [0, 1): a decay rate of 1 divides by zero in 1 - b**t."""
    for name, value in values.items():
        x = concrete_float(fn, name, value)
        if x is not None and not 0.0 <= x < 1.0:
            hint = ""
            if x == 1.0 and getattr(value, "dtype", None) in (jnp.bfloat16, jnp.float16):
                hint = (f": a decay rate like 0.999 rounds to 1 in {value.dtype}; keep it in "
                        "float32 (optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32))")
            raise ValueError(f"{fn}: {name} must be in [0, 1), got {value!r}{hint}")


def check_non_negative(fn, **values):
    """Checks that each value is >= 0 and finite in float32 (NaN fails)."""
    for name, value in values.items():
        x = concrete_float(fn, name, value)
        if x is None:
            continue
        if not 0.0 <= x < math.inf:
            raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value!r}")
        _check_finite_f32(fn, name, value, x)


def check_rate(fn, name, value):
    """Checks a learning rate or weight decay: a schedule (a callable of the step count), or a
    finite number >= 0."""
    if callable(value):
        return
    if value is None:
        raise TypeError(f"{fn}: {name} must be a number, an array or a schedule, got None")
    check_non_negative(fn, **{name: value})


def scheduled(fn, name, value, count):
    """``value`` at the step whose count (before the step) is ``count``: a schedule is called,
    as optax calls it, and what it returns is checked as a number passed directly would be."""
    if not callable(value):
        return value
    value = value(count)
    if value is None:
        raise TypeError(f"{fn}: the {name} schedule returned None; it must return a real scalar")
    check_non_negative(fn, **{f"{name} (the schedule's value)": value})
    return value


def check_bool(fn, **values):
    """Checks that static options are real Python bools."""
    for name, value in values.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_choice(fn, name, value, choices):
    """Checks that ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{fn}: {name} must be one of {shown}, got {value!r}")


def check_seed(fn, seed):
    """Checks a seed: an integer in [0, 2**32), or a traced integer scalar."""
    if is_traced(seed):
        return
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (numbers.Integral, np.integer)):
        dtype = getattr(seed, "dtype", None)
        if dtype is None or getattr(seed, "shape", None) != () or not jnp.issubdtype(dtype,
                                                                                      jnp.integer):
            raise TypeError(f"{fn}: seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"{fn}: seed must be in [0, 2**32), got {seed!r}")


def check_hyperparams(
    *,
    learning_rate: Any = None,
    b1: Any = None,
    b2: Any = None,
    eps: Any = None,
    eps_root: Any = None,
    weight_decay: Any = None,
    count: Any = None,
) -> None:
    """Checks hyperparameters that may be traced, for a step run under ``checkify.checkify``.

    adamx checks every concrete hyperparameter when a transformation is built or
    :func:`adamx.update` is called. A value passed into a jitted step is a tracer there and
    cannot be checked without a host round trip, so a bad one (``b2=1.0``) gives NaN params.
    Call this inside the step, wrapped in ``jax.experimental.checkify.checkify``, to get the
    same checks on traced values: the returned error then names the argument and its value.
    Concrete values are checked at once (and raise ``ValueError``); None skips an argument.

    Args:
      learning_rate, b1, b2, eps, eps_root, weight_decay: As in :func:`adamx.update`.
      count: A state's step count (``state.count``), which must be >= 0.

    Raises:
      ValueError: For a concrete value out of range.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> from jax.experimental import checkify
      >>> def step(b2):
      ...     adamx.check_hyperparams(b2=b2)
      ...     return adamx.update(jnp.ones(2), adamx.init(jnp.ones(2)), learning_rate=0.1, b2=b2)[0]
      >>> error, _ = jax.jit(checkify.checkify(step))(1.0)
      >>> print(error.get())  # doctest: +ELLIPSIS
      adamx.check_hyperparams: b2 must be in [0, 1), got 1.0 (`check` failed)...
    """
    fn = "adamx.check_hyperparams"
    given = {k: v for k, v in dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                                   eps_root=eps_root, weight_decay=weight_decay).items()
             if v is not None}
    concrete = {k: v for k, v in given.items() if not is_traced(v)}
    check_in_unit_interval(fn, **{k: v for k, v in concrete.items() if k in ("b1", "b2")})
    check_non_negative(fn, **{k: v for k, v in concrete.items() if k not in ("b1", "b2")})
    for name, value in given.items():
        if not is_traced(value):
            continue
        if name in ("b1", "b2"):
            checkify.check((value >= 0) & (value < 1), f"{fn}: {name} must be in [0, 1), got {{}}",
                           value)
        else:
            ok = (value >= 0) & jnp.isfinite(jnp.asarray(value, jnp.float32))
            checkify.check(ok, f"{fn}: {name} must be finite and >= 0, got {{}}", value)
    if count is not None:
        if is_traced(count):
            checkify.check(count >= 0, f"{fn}: state.count must be >= 0, got {{}}", count)
        elif int(count) < 0:
            raise ValueError(f"{fn}: state.count must be >= 0, got {int(count)}")


def describe(path):
    return jax.tree_util.keystr(path) or "<root>"


def _children(node):
    """One level of a pytree node: its (key, child) pairs."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


def first_difference(grads, tree, where, path=()):
    """The first place (depth first) where ``tree`` does not have the grads' structure, or None.

    Every leaf of ``grads`` may stand against any subtree of ``tree`` (a stored moment may be a
    small node, or None for a leaf that keeps no moment); every node of ``grads`` must be met by
    a node of the same type with the same keys. Returns a message naming the key path.
    """
    if grads is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(grads)):
        return None
    at = describe(path)
    if type(grads) is not type(tree):
        return (f"at {at} grads have a {type(grads).__name__} where {where} has a "
                f"{type(tree).__name__}")
    g_items, t_items = _children(grads), _children(tree)
    g_keys = [describe(path + k) for k, _ in g_items]
    t_keys = [describe(path + k) for k, _ in t_items]
    for g_key, t_key in zip(g_keys, t_keys):
        if g_key != t_key:
            return f"grads have {g_key} where {where} has {t_key}"
    if len(g_keys) != len(t_keys):
        if len(g_keys) > len(t_keys):
            return f"only the grads have {g_keys[len(t_keys)]}"
        return f"only {where} has {t_keys[len(g_keys)]}"
    one_level = [jax.tree.structure(x, is_leaf=lambda y, x=x: y is not x) for x in (grads, tree)]
    if one_level[0] != one_level[1]:
        return f"at {at} grads and {where} differ in the static fields of a {type(grads).__name__}"
    for (key, g), (_, t) in zip(g_items, t_items):
        found = first_difference(g, t, where, path + key)
        if found is not None:
            return found
    return None


def leaves_like(fn, where, grads_def, grads, tree):
    """``tree`` cut at the leaves of ``grads``: one entry (a subtree, or None) per grad leaf.

    Raises:
      ValueError: naming ``where`` and the first key path where ``tree`` differs from ``grads``.
    """
    try:
        return grads_def.flatten_up_to(tree)
    except (ValueError, TypeError):
        found = first_difference(grads, tree, where) or "they differ in structure"
        raise ValueError(f"{fn}: grads and {where} differ in tree structure: {found}") from None


def params_like(fn, grads_def, grads, params):
    """:func:`leaves_like` for the params, whose leaves must also have the grads' shapes (weight
    decay and param rounding would otherwise broadcast a param against its update)."""
    leaves = leaves_like(fn, "params", grads_def, grads, params)
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], leaves):
        if p is not None and np.shape(p) != np.shape(g):
            raise ValueError(f"{fn}: params{jax.tree_util.keystr(path)} has shape "
                             f"{tuple(np.shape(p))} where the grads have {tuple(np.shape(g))}")
    return leaves
