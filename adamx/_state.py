"""The optimizer state, an immutable pytree; :func:`init`; and the check that a state fits."""

from typing import Any, NamedTuple

import jax
import jax.export  # jax < 0.8 does not import it with jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import _numerics, _storage
from adamx._checks import as_array, check_bool, check_choice, is_traced, leaves_like, short
from adamx._options import ROUNDINGS

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
    Quantized moments (``"int8"``, ``"int4"``) are small nodes of arrays;
    :func:`adamx.dequantize_state` decodes them.

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
        dtype; or ``"int8"``, ``"int4"``, :func:`adamx.int8_moments`, :func:`adamx.int4_moments`.
      nu_dtype: Storage of the second moment: None keeps each param's real dtype, but float32 for
        float16 and bfloat16 params (a 16-bit second moment underflows or stalls); bfloat16,
        float32 or float64; or a quantized spec as for ``mu_dtype``.
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
    caller = "adamx.init"
    specs = Specs(_storage.check_spec(caller, "mu_dtype", mu_dtype),
                  _storage.check_spec(caller, "nu_dtype", nu_dtype))
    check_bool(caller, "amsgrad", amsgrad)
    check_choice(caller, "param_rounding", param_rounding, ROUNDINGS)
    return zeros(caller, params, specs, amsgrad=amsgrad, kahan=param_rounding == "kahan")


class Specs(NamedTuple):
    """How a transformation stores its moments: canonical ``mu_dtype`` and ``nu_dtype`` specs."""

    mu: Any = None
    nu: Any = None


def zeros(caller: str, params: PyTree, specs: Specs, *, amsgrad: bool, kahan: bool) -> AdamState:
    """:func:`init` for specs already checked."""
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not ((hasattr(p, "shape") and hasattr(p, "dtype"))
                or isinstance(p, (bool, int, float, complex))):
            raise TypeError(f"{caller}: params{jax.tree_util.keystr(path)} must be an array (or a "
                            f"jax.ShapeDtypeStruct), got {type(p).__name__}")
    def moments(spec, second):
        return jax.tree.map(lambda p: _storage.zeros(p, spec, second=second), params)

    def compensation(p):
        return jnp.zeros_like(p) if _numerics.rounds(jnp.result_type(p), "kahan") else None

    return AdamState(
        count=jnp.zeros([], jnp.int32),
        mu=moments(specs.mu, False),
        nu=moments(specs.nu, True),
        nu_max=moments(specs.nu, True) if amsgrad else None,
        compensation=jax.tree.map(compensation, params) if kahan else None,
    )


# The fields of AdamState that mirror the params' tree, one entry per leaf.
LEAF_FIELDS = AdamState._fields[1:]


def _not_a_state(caller, state):
    """The TypeError for a state that is not an AdamState, with the conversion for optax's."""
    try:
        found = optax.tree.get(state, "nu")
    except (KeyError, ValueError, TypeError):
        found = None
    if found is not None:
        return TypeError(
            f"{caller}: state must be an adamx.AdamState (from this transformation's init), got "
            f"{type(state).__name__}, an optax state: convert it with adamx.from_optax(state)")
    return TypeError(f"{caller}: state must be an adamx.AdamState, got {type(state).__name__}")


def _check_arrays(caller, state):
    """Every leaf an array: an abstract state (``jax.eval_shape`` of ``init``) only plans one."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(
                f"{caller}: state{jax.tree_util.keystr(path)} must be an array, got "
                f"{type(leaf).__name__}" + (" (an abstract state, as jax.eval_shape returns: build "
                                             "the state itself with init)"
                                             if isinstance(leaf, jax.ShapeDtypeStruct) else ""))


def _check_count(caller, count):
    dtype, shape = getattr(count, "dtype", None), getattr(count, "shape", None)
    if dtype != jnp.int32 or shape != ():
        raise ValueError(f"{caller}: state.count must be an int32 scalar, got "
                         f"{dtype if dtype is not None else type(count).__name__}"
                         f"{'' if shape is None else list(shape)}")
    if not is_traced(count) and int(count) < 0:
        raise ValueError(f"{caller}: state.count must be >= 0, got {int(count)}")


# The optional fields: what the state has, or has not, and the remedy where the transformation
# wants the field and the state lacks it, or the other way round.
_OPTIONAL = {
    "nu_max": ("nu_max (AMSGrad's maximum)", "no nu_max",
               "this transformation runs AMSGrad: build the state with its init (or "
               "adamx.init(..., amsgrad=True))",
               "this transformation is not AMSGrad: use adamx.amsgrad (or amsgrad=True), or drop it "
               "with state.replace(nu_max=None)"),
    "compensation": ("a compensation buffer", "no compensation buffer",
                     "param_rounding is 'kahan': build the state with this transformation's init (or "
                     "adamx.init(..., param_rounding='kahan'))",
                     "param_rounding is not 'kahan': build the state and the update with the same "
                     "param_rounding"),
}


def check(caller: str, state: Any, grads: PyTree, *, amsgrad: bool, kahan: bool,
          specs: Any = None) -> tuple[list, list, Any, dict]:
    """Checks that ``state`` fits a transformation and these grads; returns its per-leaf entries.

    The transformation decides the algorithm: a state with ``nu_max`` runs only under AMSGrad
    and one without only under Adam; a compensation buffer only with ``param_rounding="kahan"``.
    Every field must have the grads' tree structure and shapes, ``count`` must be an int32
    scalar >= 0, and the second moments real. With ``specs`` (a factory's :class:`Specs`), each
    moment must be stored as they say.

    Returns:
      ``(paths, grad_leaves, treedef, fields)``: the grads' key paths and leaves, their treedef,
      and for each name of :data:`LEAF_FIELDS` the list of per-leaf entries, or None where the
      state has no such field.

    Raises:
      TypeError: If ``state`` is not an AdamState (an optax state gets the conversion).
      ValueError: Naming the field and key path that does not fit.
    """
    if not isinstance(state, AdamState):
        raise _not_a_state(caller, state)
    _check_arrays(caller, state)
    _check_count(caller, state.count)
    g_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    # For a single-leaf params tree, a field of one absent entry (an untrained leaf's nu_max, a
    # float32 param's compensation) is None itself: present or not, the leaf check decides.
    single = jax.tree_util.treedef_is_leaf(treedef)
    wanted = {"nu_max": amsgrad, "compensation": kahan}
    for name, (has, has_not, missing, extra) in _OPTIONAL.items():
        present = getattr(state, name) is not None or (single and wanted[name])
        if present != wanted[name]:
            raise ValueError(f"{caller}: the state has {has if present else has_not}, but "
                             f"{missing if wanted[name] else extra}")
    paths = [path for path, _ in g_paths]
    grad_leaves = [as_array(g) for _, g in g_paths]
    fields = {}
    for name in LEAF_FIELDS:
        tree = getattr(state, name)
        if tree is None and not wanted.get(name, True):
            fields[name] = None
            continue
        entries = leaves_like(caller, f"state.{name}", treedef, grads, tree)
        spec = "any" if specs is None else (specs.mu if name == "mu" else specs.nu)
        for path, g, entry in zip(paths, grad_leaves, entries):
            where = f"state.{name}{jax.tree_util.keystr(path)}"
            if name == "compensation":
                _check_compensation(caller, where, entry, g)
            else:
                _storage.check_leaf(caller, where, entry, g, spec, second=name != "mu")
        fields[name] = entries
    return paths, grad_leaves, treedef, fields


def _check_compensation(caller, where, entry, grad):
    if entry is None:
        return
    dtype = getattr(entry, "dtype", None)
    if dtype not in (jnp.float16, jnp.bfloat16) or tuple(entry.shape) != tuple(np.shape(grad)):
        raise ValueError(f"{caller}: {where} must be None or a float16/bfloat16 array of the grads' "
                         f"shape {tuple(np.shape(grad))}, got {short(entry)}")
