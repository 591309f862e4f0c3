"""The optimizer state, an immutable pytree; :func:`init`; and the check that a state fits."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _numerics, _storage
from adamx._checks import check_bool, check_choice, is_traced, leaves_like

PyTree = Any


class AdamState(NamedTuple):
    """Adam's state: the step count and the moments, each mirroring the params' tree.

    Attributes:
      count: Steps taken so far, an int32 scalar that saturates at the int32 maximum.
      mu: The first moment (the exponential moving average of the gradients).
      nu: The second moment (the moving average of ``|g|**2``), or the infinity-norm moment
        for :func:`adamx.adamax`. Always real.
      nu_max: The running maximum of ``nu`` for AMSGrad, else None.
      compensation: For ``param_rounding="kahan"``, the part of each 16-bit param's exact value
        that its dtype could not hold (in the param's dtype), else None.

    An integer or boolean param keeps no moment: its leaves of ``mu`` and ``nu`` are None.
    Quantized moments (``"int8"``) are small nodes; :func:`adamx.dequantize_state` decodes them.

    A NamedTuple, as optax's own states are: it is a pytree, so it passes through ``jax.jit``,
    ``lax.scan``, ``lax.cond`` and ``jax.tree`` utilities; ``flax.serialization`` and orbax
    save it as a mapping of its field names; ``jax.export`` serializes it; assigning to a field
    raises. :meth:`replace` makes a changed copy.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.ones(3)})
      >>> state.count, state.mu["w"].shape
      (Array(0, dtype=int32), (3,))
      >>> state.replace(count=jnp.int32(5)).count
      Array(5, dtype=int32)
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree = None
    compensation: PyTree = None

    def replace(self, **changes: Any) -> "AdamState":
        """Returns a copy with the given fields replaced."""
        return self._replace(**changes)


jax.export.register_namedtuple_serialization(AdamState, serialized_name="adamx.AdamState")


def init(
    params: PyTree,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    amsgrad: bool = False,
    param_rounding: str = "nearest",
) -> AdamState:
    """Builds a zero Adam state for ``params``.

    The moments are built with ``zeros_like``, so under ``jax.jit`` they follow the params'
    shardings, and ``jax.eval_shape(adamx.init, params)`` plans a state without allocating it.

    Args:
      params: A pytree of arrays (or ``jax.ShapeDtypeStruct``); None and ``optax.MaskedNode``
        leaves pass through. Integer and boolean leaves are not trained: they keep no moment
        (None) and get zero updates.
      mu_dtype: Storage of the first moment: None keeps each param's dtype; a float or complex
        dtype; or ``"int8"`` / :func:`adamx.int8_moments`.
      nu_dtype: Storage of the second moment: None keeps each param's real dtype, but float32 for
        float16 and bfloat16 params (a 16-bit second moment underflows or stalls); a float dtype;
        or ``"int8"`` / :func:`adamx.int8_moments`.
      amsgrad: Also keep ``nu_max``, the running maximum of the second moment.
      param_rounding: ``"kahan"`` also keeps a compensation buffer for each float16 and bfloat16
        param; ``"nearest"`` and ``"stochastic"`` keep nothing more.

    Returns:
      An :class:`AdamState` with ``count = 0``.

    Raises:
      ValueError: If ``mu_dtype``, ``nu_dtype`` or ``param_rounding`` is not accepted.
      TypeError: If ``amsgrad`` is not a bool.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.zeros((2, 3), jnp.bfloat16)}, nu_dtype=jnp.float32)
      >>> state.mu["w"].dtype, state.nu["w"].dtype
      (dtype(bfloat16), dtype('float32'))
    """
    fn = "adamx.init"
    mu_spec = _storage.check_spec(fn, "mu_dtype", mu_dtype)
    nu_spec = _storage.check_spec(fn, "nu_dtype", nu_dtype)
    check_bool(fn, amsgrad=amsgrad)
    check_choice(fn, "param_rounding", param_rounding, _numerics.ROUNDINGS)
    return zeros(params, mu_spec=mu_spec, nu_spec=nu_spec, amsgrad=amsgrad,
                 kahan=param_rounding == "kahan")


def zeros(params, *, mu_spec, nu_spec, amsgrad, kahan):
    """:func:`init` for specs already checked."""
    def moments(spec, *, real):
        return jax.tree.map(lambda p: _storage.zeros(p, spec, real=real), params)

    def compensation(p):
        return jnp.zeros_like(p) if _numerics.rounds(jnp.result_type(p), "kahan") else None

    return AdamState(
        count=jnp.zeros([], jnp.int32),
        mu=moments(mu_spec, real=False),
        nu=moments(nu_spec, real=True),
        nu_max=moments(nu_spec, real=True) if amsgrad else None,
        compensation=jax.tree.map(compensation, params) if kahan else None,
    )


def _not_a_state(fn, state):
    """The TypeError for a state that is not an AdamState, with the conversion for optax's."""
    inner = state
    if not hasattr(inner, "mu") and isinstance(state, tuple) and state:
        inner = state[0]  # optax.adam's state: (ScaleByAdamState, ...)
    if hasattr(inner, "mu") and hasattr(inner, "nu") and hasattr(inner, "count"):
        return TypeError(
            f"{fn}: state must be an adamx.AdamState (from this transformation's init), got "
            f"{type(state).__name__} from optax; convert it with "
            "adamx.AdamState(count=s.count, mu=s.mu, nu=s.nu) where s is its ScaleByAdamState "
            "(optax.tree.get(state, 'mu') finds the moments in any optax state)")
    return TypeError(f"{fn}: state must be an adamx.AdamState, got {type(state).__name__}")


def _check_count(fn, count):
    dtype, shape = getattr(count, "dtype", None), getattr(count, "shape", None)
    if dtype != jnp.int32 or shape != ():
        raise ValueError(f"{fn}: state.count must be an int32 scalar, got "
                         f"{dtype if dtype is not None else type(count).__name__}"
                         f"{'' if shape is None else list(shape)}")
    if not is_traced(count) and int(count) < 0:
        raise ValueError(f"{fn}: state.count must be >= 0, got {int(count)}")


def _presence(fn, has, has_not, present, wanted, hint):
    if present != wanted:
        raise ValueError(f"{fn}: the state has {has if present else has_not}, but {hint}")


def check(fn, state, grads, *, amsgrad, kahan):
    """Checks that ``state`` fits a transformation and these grads; returns its leaves.

    The transformation decides the algorithm: a state with ``nu_max`` runs only under AMSGrad
    and one without only under Adam; a compensation buffer only with ``param_rounding="kahan"``.
    Every field must have the grads' tree structure and shapes, ``count`` must be an int32
    scalar >= 0, and the second moments must be real.

    Returns:
      ``(grad_leaves, treedef, fields)`` where ``fields`` maps each field name (mu, nu, nu_max,
      compensation) to its list of per-leaf entries, or to None when the state has no such field.

    Raises:
      TypeError: If ``state`` is not an AdamState (an optax state gets the conversion).
      ValueError: Naming the field and key path that does not fit.
    """
    if not isinstance(state, AdamState):
        raise _not_a_state(fn, state)
    _check_count(fn, state.count)
    _presence(fn, "nu_max (AMSGrad's maximum)", "no nu_max", state.nu_max is not None, amsgrad,
              "this transformation runs AMSGrad" if amsgrad else
              "this transformation is not AMSGrad: use adamx.amsgrad (or update(..., amsgrad=True)),"
              " or drop it with state.replace(nu_max=None)")
    _presence(fn, "a compensation buffer", "no compensation buffer", state.compensation is not None,
              kahan,
              "param_rounding is 'kahan'" if kahan else
              "param_rounding is not 'kahan': build the state and the update with the same "
              "param_rounding")
    g_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    grad_leaves = [g for _, g in g_paths]
    fields = {}
    for name in ("mu", "nu", "nu_max", "compensation"):
        tree = getattr(state, name)
        if tree is None and name in ("nu_max", "compensation"):
            fields[name] = None  # absent (mu and nu are None only where no leaf is trained)
            continue
        entries = leaves_like(fn, f"state.{name}", treedef, grads, tree)
        for (path, g), entry in zip(g_paths, entries):
            where = f"state.{name}{jax.tree_util.keystr(path)}"
            if name == "compensation":
                _check_compensation(fn, where, entry, g)
                continue
            _storage.check_leaf(fn, where, entry, g)
            dtype = getattr(entry, "dtype", None)
            if name != "mu" and dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
                raise ValueError(f"{fn}: {where} must be real, got {dtype}")
        fields[name] = entries
    return grad_leaves, treedef, fields


def _check_compensation(fn, where, entry, grad):
    if entry is None:
        return
    dtype = getattr(entry, "dtype", None)
    if dtype not in (jnp.float16, jnp.bfloat16) or tuple(entry.shape) != tuple(np.shape(grad)):
        raise ValueError(f"{fn}: {where} must be None or a float16/bfloat16 array of the grads' "
                         f"shape {tuple(np.shape(grad))}, got {dtype}{list(getattr(entry, 'shape', ()))}")

