"""Moving a running job between optax and adamx: :func:`from_optax` and :func:`to_optax`.

An optax Adam-family optimizer keeps its moments in one ``ScaleByAdamState`` (or
``ScaleByAmsgradState``) node, chained with stateless nodes and, for a scheduled learning rate,
a ``ScaleByScheduleState``; the adamx factory of the same name keeps one :class:`AdamState`.
Both functions convert those nodes wherever they sit in a larger state (an ``optax.chain``,
``optax.inject_hyperparams``, ``optax.MultiSteps``, a flax ``TrainState``'s ``opt_state``) and
leave everything else as it is. Arrays are moved, never rounded (but for a float16 second
moment, which adamx widens to float32 and gives back in float16 exactly): a state converted and
converted back is bit for bit the one you started from.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx._checks import keystr
from adamx._formats import is_quantized
from adamx._state import AdamState

_MOMENTS = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)
# The nodes an optax alias chains after its moments: the learning rate, weight decay and its mask.
_STATELESS = (optax.EmptyState, optax.ScaleByScheduleState, optax.MaskedState)


def _is_optax_adam(node: Any) -> bool:
    """An optax Adam-family state: its moments node alone (``scale_by_adam``), or an alias's
    tuple of the moments node and stateless or schedule nodes (``adam``, ``adamw``, ...)."""
    if isinstance(node, _MOMENTS):
        return True
    return (type(node) is tuple and len(node) > 1 and isinstance(node[0], _MOMENTS)
            and all(isinstance(x, _STATELESS) for x in node[1:]))


def _schedule_counts(node):
    return [x.count for x in node[1:] if isinstance(x, optax.ScaleByScheduleState)]


def _is_ours(node: Any) -> bool:
    return isinstance(node, AdamState)


def _adam_state(caller, node, like=None):
    """The AdamState of an optax Adam node (a moments node, or an alias's tuple), fitted to the
    AdamState ``like`` where given."""
    if not _is_optax_adam(node):
        raise ValueError(f"{caller}: expected an optax Adam-family state where the adamx state has an "
                         f"AdamState, got {type(node).__name__}")
    moments = node if isinstance(node, _MOMENTS) else node[0]
    for x in () if moments is node else node[1:]:
        count = getattr(x, "count", None)
        if (isinstance(x, optax.ScaleByScheduleState) and not isinstance(count, jax.core.Tracer)
                and not np.array_equal(count, moments.count)):
            raise ValueError(f"{caller}: the learning-rate schedule has counted {int(count)} steps and "
                             f"the moments {int(moments.count)}; adamx keeps one count")
    def moment(name, ours, theirs):
        if ours is not None and not hasattr(ours, "dtype"):
            raise TypeError(f"{caller}: the optax state's {name} must hold arrays, got "
                            f"{type(ours).__name__}")
        if ours is None or not jnp.issubdtype(ours.dtype, jnp.inexact):
            return None  # an integer param's moment: adamx keeps none
        if theirs is None:
            raise ValueError(f"{caller}: optax keeps a {ours.dtype} moment where like has None (a "
                             "param that is not trained)")
        if name == "mu":
            return ours
        if jnp.iscomplexobj(ours):  # a complex param's: optax's imaginary part is 0, adamx's real
            ours = ours.real
        return ours.astype(jnp.float32) if ours.dtype == jnp.float16 else ours

    if like is not None and (like.nu_max is not None) != hasattr(moments, "nu_max"):
        raise ValueError(f"{caller}: like is {'' if like.nu_max is not None else 'not '}AMSGrad's "
                         f"state, and the optax state {'has no' if like.nu_max is not None else 'has'}"
                         " nu_max")
    fields = {name: _fit(caller, name, getattr(moments, name),
                         _ANY if like is None else getattr(like, name), moment)
              for name in ("mu", "nu", "nu_max") if hasattr(moments, name)}
    return AdamState(count=moments.count, **fields)


_ANY = object()  # no tree to fit: any structure and shapes


def _fit(caller, name, ours, theirs, leaf):
    """``leaf(ours, theirs)`` for each pair of leaves of two moment trees, which must have one
    structure and, leaf by leaf, one shape (None, a param that keeps no moment, fits any leaf)."""
    if theirs is _ANY:
        return jax.tree.map(lambda x: leaf(name, x, _ANY), ours)
    is_entry = lambda x: x is None or is_quantized(x)  # noqa: E731
    (o_paths, o_def), t_leaves = (jax.tree_util.tree_flatten_with_path(ours, is_leaf=is_entry),
                                  jax.tree.leaves(theirs, is_leaf=is_entry))
    if o_def != jax.tree.structure(theirs, is_leaf=is_entry):
        keys = [{keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=is_entry)[0]} for tree in (ours, theirs)]
        found = "; ".join(f"only {side} has {', '.join(sorted(only)[:3])}" for side, only in
                          (("state", keys[0] - keys[1]), ("like", keys[1] - keys[0])) if only)
        raise ValueError(f"{caller}: the {name} of state and like are the moments of different "
                         f"params: {found or 'their trees differ in structure'}")
    out = []
    for (path, o), t in zip(o_paths, t_leaves):
        shapes = [x.leaf_shape if is_quantized(x) else tuple(np.shape(x)) for x in (o, t)
                  if x is not None]
        if len(set(shapes)) > 1:
            raise ValueError(f"{caller}: {name}{keystr(path)} has shape {shapes[0]} in state and "
                             f"{shapes[1]} in like: they are the moments of different params")
        out.append(leaf(name, o, t))
    return o_def.unflatten(out)


def from_optax(state: Any, like: Any = None) -> Any:
    """The adamx state for an optax Adam-family state: each optax Adam node becomes an
    :class:`adamx.AdamState` with its ``count``, ``mu`` and ``nu`` (and AMSGrad's ``nu_max``).

    Use it to continue a job that ran ``optax.adam`` (or ``adamw``, ``nadam``, ``nadamw``,
    ``amsgrad``, ``adamax``, ``adamaxw``, ``scale_by_adam``, ``scale_by_amsgrad``,
    ``scale_by_adamax``) with the adamx transformation of the same name: the converted state has
    the structure that transformation's ``init`` gives, inside whatever holds it, and the next
    steps equal optax's. ``optax.amsgrad`` keeps the maximum of the bias-corrected second moment:
    continue it with ``adamx.amsgrad(..., max_bias_corrected=True)``. A float16 second moment is
    widened to float32 (exactly): adamx refuses float16 there, where ``(1 - b2) g**2`` underflows.

    Args:
      state: An optax optimizer state, or any pytree holding one (a flax ``TrainState``'s
        ``opt_state``, a restored checkpoint's tree).
      like: The state of the adamx transformation to continue with (its ``init``, or
        ``jax.eval_shape`` of it), which says where its AdamStates are. Without it, each optax
        alias's state (its moments node and the stateless nodes after it, as ``optax.adam``
        keeps them) becomes one AdamState, and a lone moments node (``optax.scale_by_adam``'s)
        one too. Pass it for a chain such as ``optax.chain(adamx.scale_by_amsgrad(),
        optax.scale(-lr))``, whose state has the same structure as ``optax.amsgrad``'s.

    Returns:
      ``state`` with its optax Adam nodes replaced by :class:`adamx.AdamState` nodes.

    Raises:
      ValueError: If ``state`` holds no optax Adam node (or not where ``like`` has an
        AdamState), or a node's schedule has counted a different number of steps than its
        moments (adamx keeps one count for both).

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> grads = {"w": jnp.array([0.5, 0.25])}
      >>> peer = optax.adam(0.1)
      >>> _, optax_state = peer.update(grads, peer.init(params))  # a job that ran optax
      >>> state = adamx.from_optax(optax_state)
      >>> type(state).__name__, int(state.count)
      ('AdamState', 1)
      >>> mine, _ = adamx.adam(0.1).update(grads, state)  # continues as optax would,
      >>> theirs, _ = peer.update(grads, optax_state)      # to optax's float32 1 - b2**t
      >>> bool(jnp.allclose(mine["w"], theirs["w"], rtol=1e-4))
      True
    """
    caller = "adamx.from_optax"
    if like is not None:
        def convert(ours, node):
            return _adam_state(caller, node, ours) if _is_ours(ours) else node

        return _mapped(caller, convert, like, state, "like")
    found = []

    def convert_alias(node):
        if not _is_optax_adam(node):
            return node
        found.append(node)
        return _adam_state(caller, node)

    converted = jax.tree.map(convert_alias, state, is_leaf=_is_optax_adam)
    if not found:
        raise ValueError(f"{caller}: state holds no optax Adam-family state (a ScaleByAdamState or "
                         f"ScaleByAmsgradState), got {type(state).__name__}")
    return converted


def to_optax(state: Any, like: Any) -> Any:
    """The optax state for an adamx state: each :class:`adamx.AdamState` goes back into the optax
    Adam node at the same place in ``like``, and that node's schedule counts take its count.

    Args:
      state: A state of adamx transformations (or a pytree holding them, as :func:`from_optax`
        returns).
      like: The state of the optax transformation to continue with, as its ``init`` returns it
        (or ``jax.eval_shape`` of it). Where ``state`` has an AdamState, ``like`` has its optax
        node; elsewhere the two have one structure, and ``state``'s values are kept.

    Returns:
      A state with ``like``'s structure and ``state``'s values.

    Raises:
      ValueError: If ``state`` and ``like`` differ in structure, a state has quantized moments
        or a Kahan compensation (optax keeps neither), or ``nu_max`` is missing on one side.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = adamx.adam(0.1)
      >>> _, state = tx.update({"w": jnp.array([0.5, 0.25])}, tx.init(params))
      >>> optax_state = adamx.to_optax(state, optax.adam(0.1).init(params))
      >>> type(optax_state[0]).__name__, int(optax_state[0].count)
      ('ScaleByAdamState', 1)
      >>> back = adamx.from_optax(optax_state)
      >>> bool(jnp.array_equal(back.nu["w"], state.nu["w"]))
      True
    """
    caller = "adamx.to_optax"

    def convert(ours, node):
        if not _is_ours(ours):
            return ours
        if not _is_optax_adam(node):
            raise ValueError(f"{caller}: like has a {type(node).__name__} where state has an AdamState")
        if any(is_quantized(x) for x in jax.tree.leaves((ours.mu, ours.nu), is_leaf=is_quantized)):
            raise ValueError(f"{caller}: optax keeps float moments; decode quantized ones first "
                             "(adamx.dequantize_state), knowing that their codes are not float32")
        if ours.compensation is not None:
            raise ValueError(f"{caller}: optax keeps no Kahan compensation; drop it with "
                             "state.replace(compensation=None) (its sub-ulp remainders are lost)")
        moments = node if isinstance(node, _MOMENTS) else node[0]
        if isinstance(moments, optax.ScaleByAmsgradState) != (ours.nu_max is not None):
            raise ValueError(f"{caller}: like is {'' if ours.nu_max is None else 'not '}AMSGrad's "
                             f"state, and state {'has' if ours.nu_max is not None else 'has no'} "
                             "nu_max")
        def moment(name, x, theirs):
            if x is None:  # a param adamx does not train: optax's zero moment, as its init makes
                return jnp.zeros(np.shape(theirs), theirs.dtype)
            return x.astype(theirs.dtype)  # a float16 moment from_optax widened goes back exactly

        fields = {name: _fit(caller, name, getattr(ours, name), getattr(moments, name), moment)
                  for name in ("mu", "nu", "nu_max") if hasattr(moments, name)}
        fields["count"] = ours.count
        if isinstance(node, _MOMENTS):
            return moments._replace(**fields)
        rest = [x._replace(count=ours.count) if isinstance(x, optax.ScaleByScheduleState) else x
                for x in node[1:]]
        return (moments._replace(**fields), *rest)

    return _mapped(caller, convert, state, like, "state")


def _mapped(caller, convert, ours, theirs, name):
    """``convert(our node, their node)`` over ``ours``, whose AdamStates stand against whole
    optax subtrees of ``theirs``."""
    try:
        return jax.tree.map(convert, ours, theirs, is_leaf=_is_ours)
    except ValueError as e:
        if str(e).startswith(caller):
            raise
        raise ValueError(f"{caller}: state and like differ in structure outside their Adam nodes: "
                         f"{e}") from None
