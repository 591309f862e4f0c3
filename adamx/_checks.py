"""Argument and structure checks whose messages name the call, the argument, the allowed range and
the value, or the key path where a tree differs.

Concrete values (Python numbers, NumPy values, concrete JAX arrays of any real dtype) are checked
when a transformation is built or a pure function is called. A tracer's value is not forced: only
its shape and dtype are checked here (:func:`adamx.check_hyperparams` checks values under
``jax.experimental.checkify``).
"""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Concrete hyperparameters must be finite in float32, the narrowest dtype the math runs in:
# ``learning_rate=1e39`` is a finite float64 but an infinite step.
F32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = int(np.iinfo(np.int32).max)


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def short(x: Any) -> str:
    """A short description for messages: ``float32[3]`` for an array or tracer, else the type."""
    dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
    if dtype is None or shape is None:
        return "None" if x is None else type(x).__name__
    return f"{dtype}{list(shape)}"


def _real_scalar(caller, name, value, kinds, words):
    """Checks a tracer's or an array's shape and dtype; returns whether ``value`` is traced."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, jax.ShapeDtypeStruct) or dtype is None or getattr(
            value, "shape", None) != () or not any(
            jnp.issubdtype(dtype, kind) for kind in kinds):
        got = f"a traced {short(value)}" if is_traced(value) else repr(value)
        raise TypeError(f"{caller}: {name} must be {words}, got {got}")
    return is_traced(value)


def concrete_float(caller: str, name: str, value: Any):
    """``value`` as a Python float, or None for a (real scalar) tracer.

    Raises:
      TypeError: If ``value`` is not a real number or real scalar array (bools and strings are not).
    """
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{caller}: {name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float64: out of every range
            return float(np.sign(value)) * np.inf
    if _real_scalar(caller, name, value, (jnp.floating, jnp.integer), "a real scalar"):
        return None
    return float(np.asarray(value, np.float64))


def concrete_integer(caller: str, name: str, value: Any):
    """``value`` as a Python int, or None for an integer scalar tracer.

    Raises:
      TypeError: If ``value`` is not an integer or an integer scalar array.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer,
                                                                      jax.Array, np.ndarray)):
        raise TypeError(f"{caller}: {name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if _real_scalar(caller, name, value, (jnp.integer,), "an integer scalar"):
        return None
    return int(np.asarray(value))


def check_bool(caller: str, name: str, value: Any) -> None:
    """Checks that a static option is a real Python (or NumPy) bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{caller}: {name} must be True or False, got {value!r}")


def check_choice(caller: str, name: str, value: Any, choices: tuple) -> None:
    """Checks that ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{caller}: {name} must be one of {shown}, got {value!r}")


def check_seed(caller: str, name: str, value: Any) -> None:
    """Checks a seed: an integer in [0, 2**32), or a traced integer scalar."""
    x = concrete_integer(caller, name, value)
    if x is not None and not 0 <= x < 2**32:
        raise ValueError(f"{caller}: {name} must be in [0, 2**32), got {value!r}")


# ---- tree structure ------------------------------------------------------------------------------

def keystr(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _children(node):
    """One level of a pytree node: its (key, child) pairs."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


def first_difference(grads: Any, tree: Any, where: str, path: tuple = ()):
    """The first place (depth first) where ``tree`` does not have the grads' structure, or None.

    Every leaf of ``grads`` may stand against any subtree of ``tree`` (a stored moment may be a
    small node, or None for a leaf that keeps no moment); every node of ``grads`` must be met by
    a node of the same type with the same keys. Returns a message naming the key path.
    """
    if grads is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(grads)):
        return None
    if type(grads) is not type(tree):
        return (f"at {keystr(path)} grads have a {type(grads).__name__} where {where} has a "
                f"{type(tree).__name__}")
    g_items, t_items = _children(grads), _children(tree)
    g_keys = [keystr(path + k) for k, _ in g_items]
    t_keys = [keystr(path + k) for k, _ in t_items]
    missing = [k for k in t_keys if k not in g_keys]
    extra = [k for k in g_keys if k not in t_keys]
    if len(g_keys) != len(t_keys) and (missing or extra):  # keys left out or added, by name
        return "; ".join([f"only the grads have {', '.join(extra)}"] * bool(extra)
                         + [f"only {where} has {', '.join(missing)}"] * bool(missing))
    for g_key, t_key in zip(g_keys, t_keys):
        if g_key != t_key:
            return f"grads have {g_key} where {where} has {t_key}"
    if len(g_keys) > len(t_keys):
        return f"only the grads have {g_keys[len(t_keys)]}"
    if len(g_keys) < len(t_keys):
        return f"only {where} has {t_keys[len(g_keys)]}"
    one_level = [jax.tree.structure(x, is_leaf=lambda y, x=x: y is not x) for x in (grads, tree)]
    if one_level[0] != one_level[1]:
        return (f"at {keystr(path)} grads and {where} differ in the static fields of a "
                f"{type(grads).__name__}")
    for (key, g), (_, t) in zip(g_items, t_items):
        found = first_difference(g, t, where, path + key)
        if found is not None:
            return found
    return None


def leaves_like(caller: str, where: str, grads_def: Any, grads: Any, tree: Any) -> list:
    """``tree`` cut at the leaves of ``grads``: one entry (a subtree, or None) per grad leaf.

    Raises:
      ValueError: Naming ``where`` and the first key path where ``tree`` differs from ``grads``.
    """
    try:
        return grads_def.flatten_up_to(tree)
    except (ValueError, TypeError):
        found = first_difference(grads, tree, where) or "they differ in structure"
        raise ValueError(f"{caller}: grads and {where} differ in tree structure: {found}") from None


def params_like(caller: str, grads_def: Any, grads: Any, params: Any, paths: list) -> list:
    """:func:`leaves_like` for the params, whose leaves must also have the grads' shapes (weight
    decay and param rounding would otherwise broadcast a param against its update)."""
    leaves = leaves_like(caller, "params", grads_def, grads, params)
    for path, g, p in zip(paths, grads_def.flatten_up_to(grads), leaves):
        if p is None:
            raise ValueError(f"{caller}: params{jax.tree_util.keystr(path)} is None where the grads "
                             f"have {short(g)}")
        if np.shape(p) != np.shape(g):
            raise ValueError(f"{caller}: params{jax.tree_util.keystr(path)} has shape "
                             f"{tuple(np.shape(p))} where the grads have {tuple(np.shape(g))}")
    return [as_array(p) for p in leaves]


def as_array(x: Any) -> Any:
    """A Python number leaf (which optax and ``init`` accept) as the array JAX makes of it."""
    return jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x
