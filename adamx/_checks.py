"""Hyperparameter and structure checks whose messages name the call, the argument and the value.

Concrete values (Python numbers, NumPy values, concrete JAX arrays) are checked; tracers are left
alone, so a hyperparameter passed into a jitted step is never forced to a concrete value.
"""

import math
import numbers

import jax
import numpy as np


def concrete_float(fn, name, value):
    """Returns ``value`` as a Python float, or None for a tracer; raises TypeError otherwise."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        array = np.asarray(value)
    except Exception:  # an object NumPy cannot read is not a number
        array = None
    if array is None or array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {value!r}")
    if np.iscomplexobj(array):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {value!r}")
    return float(array)


def check_in_unit_interval(fn, **values):
    """Checks that each value lies in [0, 1): a decay rate of 1 divides by zero in 1 - b**t."""
    for name, value in values.items():
        x = concrete_float(fn, name, value)
        if x is not None and not 0.0 <= x < 1.0:
            raise ValueError(f"{fn}: {name} must be in [0, 1), got {value!r}")


def check_non_negative(fn, **values):
    """Checks that each value is finite and >= 0 (NaN fails)."""
    for name, value in values.items():
        x = concrete_float(fn, name, value)
        if x is not None and not (0.0 <= x < math.inf):
            raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value!r}")


def check_learning_rate(fn, learning_rate):
    """Checks a learning rate: a schedule (callable), or a finite number >= 0."""
    if callable(learning_rate):
        return
    check_non_negative(fn, learning_rate=learning_rate)


def check_bool(fn, **values):
    """Checks that static options are real Python bools."""
    for name, value in values.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def _describe(path):
    return jax.tree_util.keystr(path) or "<root>"


def _first_node_difference(a, b, is_leaf, path=()):
    """The first key path (depth first) where two trees with equal key paths differ in node type."""
    if type(a) is not type(b):
        return path, type(a).__name__, type(b).__name__
    children = [
        jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y, x=x: y is not x or is_leaf(y))[0]
        for x in (a, b)
    ]
    for (key, child_a), (_, child_b) in zip(*children):
        if child_a is not a:
            found = _first_node_difference(child_a, child_b, is_leaf, path + key)
            if found is not None:
                return found
    return None


def check_same_structure(fn, grads, moments, *, is_leaf):
    """Raises ValueError naming the first key path where ``grads`` and ``moments`` differ.

    Args:
      fn: The public name to report.
      grads: The gradient tree.
      moments: A moment tree of the state (``mu``), flattened with ``is_leaf``.
      is_leaf: Marks a stored moment (which may itself be a small pytree node) as one leaf.

    Returns:
      The flat lists ``(grad_leaves, moment_leaves)`` and the gradients' treedef.
    """
    g_paths, g_def = jax.tree_util.tree_flatten_with_path(grads)
    m_paths, m_def = jax.tree_util.tree_flatten_with_path(moments, is_leaf=is_leaf)
    if g_def != m_def:
        g_keys = [_describe(p) for p, _ in g_paths]
        m_keys = [_describe(p) for p, _ in m_paths]
        for g_key, m_key in zip(g_keys, m_keys):
            if g_key != m_key:
                raise ValueError(
                    f"{fn}: grads and state differ in tree structure: grads have {g_key} "
                    f"where the state has {m_key}"
                )
        if len(g_keys) != len(m_keys):
            longer, which = (g_keys, "grads") if len(g_keys) > len(m_keys) else (m_keys, "state")
            raise ValueError(
                f"{fn}: grads and state differ in tree structure: only the {which} have "
                f"{longer[min(len(g_keys), len(m_keys))]}"
            )
        path, g_type, m_type = _first_node_difference(grads, moments, is_leaf)
        raise ValueError(
            f"{fn}: grads and state differ in node type at {_describe(path)}: grads have a "
            f"{g_type} where the state has a {m_type}"
        )
    for (path, g), (_, m) in zip(g_paths, m_paths):
        if np.shape(g) != tuple(m.shape):
            raise ValueError(
                f"{fn}: grads{_describe(path)} has shape {np.shape(g)} but the state expects "
                f"{tuple(m.shape)}"
            )
    return [g for _, g in g_paths], [m for _, m in m_paths], g_def
