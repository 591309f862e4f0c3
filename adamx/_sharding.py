"""Shardings for optimizer state: ZeRO-1 partitioning of the moments over a data axis, and
host offload of the moments.

`init` builds the moments with `zeros_like`-style ops, so under `jax.jit` (or eagerly on sharded
arrays) they take the params' shardings, and `update` is elementwise, so it keeps them. The
helpers here only *return* shardings; the caller passes them to `jax.jit(..., out_shardings=...)`
or `jax.device_put`, and XLA inserts the communication. The one move adamx makes itself is
streaming a host-resident moment to device memory and back inside the step (`to_device`,
`to_memory_of`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adamx._formats import is_quantized
from adamx._state import LEAF_FIELDS, AdamState

__all__ = ["host_offload_shardings", "zero1_shardings"]


def _base_spec(leaf: Any, mesh: Mesh) -> list:
    """The leaf's own partition spec on `mesh` (padded to its rank), or all-replicated."""
    spec = [None] * len(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    # A sharding on another mesh (or a single-device one) says nothing about this mesh.
    if isinstance(sharding, NamedSharding) and dict(sharding.mesh.shape) == dict(mesh.shape):
        spec[: len(sharding.spec)] = list(sharding.spec)
    return spec


def _uses_axis(entry: Any, axis: str) -> bool:
    return entry == axis or (isinstance(entry, tuple) and axis in entry)


def _zero1_spec(leaf: Any, mesh: Mesh, axis: str, dim: Any = "largest") -> PartitionSpec:
    """Put `axis` on dimension `dim` of `leaf` (by default the largest free one that
    `mesh.shape[axis]` divides), unless its spec uses `axis` already or `dim` does not divide."""
    spec = _base_spec(leaf, mesh)
    if any(_uses_axis(entry, axis) for entry in spec):
        return PartitionSpec(*spec)
    size = mesh.shape[axis]
    free = [d for d, entry in enumerate(spec) if entry is None and leaf.shape[d] % size == 0]
    if dim == "largest" and free:
        # max() keeps the first of equal sizes, so ties go to the leading dimension.
        spec[max(free, key=lambda d: leaf.shape[d])] = axis
    elif dim in free:
        spec[dim] = axis
    return PartitionSpec(*spec)


def _base_specs(moment: Any, mesh: Mesh) -> dict:
    return {field: _base_spec(getattr(moment, field), mesh) for field in moment._fields}


def _quantized_shardings(moment: Any, mesh: Mesh, axis: str, split: bool) -> Any:
    base = _base_specs(moment, mesh)
    specs = moment.zero1_specs(mesh, axis, base) if split else base
    return type(moment)(*(NamedSharding(mesh, PartitionSpec(*specs[f])) for f in moment._fields))


def _leaf_shardings(entries: list, mesh: Mesh, axis: str) -> list:
    """ZeRO-1 of one param's entries in the state (its mu, nu, nu_max, compensation; None where
    absent): one split for all of them, since the step combines them elementwise. Plain arrays
    split along their largest free dimension; beside a quantized moment, which splits as one
    unit along its leading dimension or not at all, every entry splits there or not at all."""
    quantized = [x for x in entries if is_quantized(x)]
    split = all(q.zero1_specs(mesh, axis, _base_specs(q, mesh)) is not None for q in quantized)
    dim = "largest" if not quantized else (0 if split else None)

    def shard(x):
        if x is None:
            return None
        if is_quantized(x):
            return _quantized_shardings(x, mesh, axis, split)
        return NamedSharding(mesh, _zero1_spec(x, mesh, axis, dim))

    return [shard(x) for x in entries]


def _state_shardings(state: Any, mesh: Mesh, axis: str) -> Any:
    """ZeRO-1 of an AdamState: per param, one split for all its entries."""
    is_entry = lambda x: x is None or is_quantized(x)  # noqa: E731
    flat = {name: jax.tree.flatten(getattr(state, name), is_leaf=is_entry)
            for name in LEAF_FIELDS if getattr(state, name) is not None}
    per_leaf = zip(*(leaves for leaves, _ in flat.values()))
    split = [_leaf_shardings(list(entries), mesh, axis) for entries in per_leaf]
    fields = {name: treedef.unflatten([s[i] for s in split])
              for i, (name, (_, treedef)) in enumerate(flat.items())}
    return state._replace(count=NamedSharding(mesh, _zero1_spec(state.count, mesh, axis)), **fields)


def zero1_shardings(state: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Shardings that split an optimizer state over one mesh axis (ZeRO stage 1).

    Each device then holds about 1/N of the moments, N = ``mesh.shape[axis]``, while the params
    (whose shardings the caller keeps) stay replicated over ``axis``. The rule, applied to every
    array of ``state`` (so to ``count`` and to each moment array):

    1. Start from the array's own partition spec when it carries a ``NamedSharding`` on a mesh of
       the same axes and sizes (a model-sharded moment keeps its ``"model"`` split); otherwise
       start from fully replicated.
    2. If the spec already uses ``axis``, keep it as is.
    3. Otherwise put ``axis`` on the largest dimension that is not sharded yet and whose size is
       divisible by N; among equal sizes, the leading one. A param's entries (its ``mu``, ``nu``,
       ``nu_max`` and ``compensation``) split alike, since the step combines them elementwise.
    4. An array with no such dimension (scalars such as ``count``, shapes N does not divide)
       stays replicated over ``axis``: it is kept whole on every device.

    A quantized moment is split as one unit, along the leading dimension of its arrays, when none
    of them is sharded yet; otherwise all keep the specs they have (whole on every device unless
    already sharded). Its param's other entries then split along that leading dimension too,
    or not at all. Block-wise (:class:`adamx.Int8Blocks`, :class:`adamx.Int4Blocks`): codes and
    ``absmax`` split only into N parts of whole blocks, so decoding needs no communication.
    Rank-1 (:class:`adamx.Int4Rank1`): codes and ``row_max`` split by rows when N divides the
    rows, ``col_max`` stays whole; each step's new ``col_max`` (a maximum over all rows) is one
    all-reduce of that small vector, which XLA inserts.

    Args:
      state: An optimizer state, concrete (``adamx.init(params)``) or abstract
        (``jax.eval_shape(adamx.init, params)``): any pytree whose leaves have ``.shape``.
      mesh: The device mesh; it must have an axis named ``axis``.
      axis: The mesh axis to split the state over, usually the data-parallel one.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``state``, for
      ``jax.jit(init_or_step, out_shardings=...)`` or ``jax.device_put``.

    Raises:
      ValueError: If ``mesh`` has no axis named ``axis``.
      TypeError: If ``mesh`` is not a mesh, or a leaf of ``state`` has no shape.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = {"w": jnp.zeros((3, 8)), "b": jnp.zeros((3,))}
      >>> shardings = adamx.zero1_shardings(jax.eval_shape(adamx.init, params), mesh)
      >>> tuple(shardings.mu["w"].spec), tuple(shardings.mu["b"].spec), tuple(shardings.count.spec)
      ((None, 'data'), ('data',), ())
      >>> state = jax.jit(adamx.init, out_shardings=shardings)(params)
    """
    caller = "adamx.zero1_shardings"
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"{caller}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{caller}: axis must be one of the mesh axes {mesh.axis_names}, got {axis!r}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(leaf, "shape"):
            raise TypeError(f"{caller}: state{jax.tree_util.keystr(path)} must be an array or a "
                            f"jax.ShapeDtypeStruct, got {type(leaf).__name__}")
    def shardings(node):
        if isinstance(node, AdamState):
            return _state_shardings(node, mesh, axis)
        return _leaf_shardings([node], mesh, axis)[0]

    return jax.tree.map(shardings, state,
                        is_leaf=lambda x: isinstance(x, AdamState) or is_quantized(x))


# ---- Host offload ---------------------------------------------------------------------------------

def host_offload_shardings(state: Any) -> Any:
    """Shardings that keep an optimizer state's moments in pinned host memory between steps.

    Each array of the moments of every :class:`adamx.AdamState` in ``state`` (``mu``, ``nu``,
    ``nu_max``, and a Kahan ``compensation``; the codes and scales of a quantized moment) keeps
    its own sharding, moved to ``"pinned_host"`` memory; everything else (``count``, and the rest
    of an ``optax.chain`` or ``optax.inject_hyperparams`` state) stays in device memory. Pass the
    result to ``jax.device_put`` for the state (and, if you like, to
    ``jax.jit(..., out_shardings=...)``). Inside the step, :func:`adamx.update` streams each
    host-resident moment to the device, updates it there, and streams it back, so device memory
    holds a leaf's moments only while the step updates them (XLA schedules the copies). Composes
    with ZeRO-1: ``host_offload_shardings(zero1_shardings(state, mesh))``. (JAX tracks only pinned
    host memory inside a jitted step, so ``"unpinned_host"`` is not offered.)

    On CPU it needs jaxlib 0.10.2 or later, where a jitted step keeps an array in pinned host
    memory; before, it would silently stay in device memory, so adamx refuses it there.

    Args:
      state: An optimizer state holding :class:`adamx.AdamState` nodes (concrete, or abstract from
        ``jax.eval_shape`` with shardings), or a pytree of shardings shaped like one (e.g. from
        :func:`zero1_shardings`). Leaves without a sharding get the default device's.

    Returns:
      A pytree of shardings with the structure of ``state``.

    Raises:
      ValueError: If ``state`` holds no AdamState, its devices have no pinned host memory, or
        this jaxlib's XLA:CPU cannot keep an array there inside a step (before jaxlib 0.10.2).

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), adamx.adam(1e-3))
      >>> state = tx.init({"w": jnp.zeros((4, 3))})
      >>> try:
      ...     shardings = adamx.host_offload_shardings(state)
      ... except ValueError as e:  # XLA:CPU before jaxlib 0.10.2
      ...     assert "host offload on CPU needs jaxlib >= 0.10.2" in str(e)
      ... else:
      ...     assert (shardings[1].mu["w"].memory_kind, shardings[1].count.memory_kind) == (
      ...         "pinned_host", "device")
      ...     state = jax.device_put(state, shardings)
    """
    caller = "adamx.host_offload_shardings"

    def sharding_of(leaf):
        if isinstance(leaf, jax.sharding.Sharding):
            return leaf
        found = getattr(leaf, "sharding", None)
        return found if found is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(leaf, kind):
        sharding = sharding_of(leaf)
        if kind != "device":
            _check_offload(caller, sharding)
        return sharding.with_memory_kind(kind)

    def offload(node):
        if not isinstance(node, AdamState):
            return jax.tree.map(lambda x: place(x, "device"), node)
        fields = {name: jax.tree.map(lambda x: place(x, "pinned_host"), getattr(node, name))
                  for name in LEAF_FIELDS}
        return node._replace(count=place(node.count, "device"), **fields)

    is_state = lambda x: isinstance(x, AdamState)  # noqa: E731
    if not any(is_state(x) for x in jax.tree.leaves(state, is_leaf=is_state)):
        raise ValueError(f"{caller}: state holds no adamx.AdamState, got {type(state).__name__}")
    return jax.tree.map(offload, state, is_leaf=is_state)


def _check_offload(caller, sharding):
    kinds = {m.kind for d in sharding.device_set for m in d.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"{caller}: the devices of this state have no 'pinned_host' memory (they "
                         f"have {sorted(kinds)})")
    _check_jit_keeps_host(caller, next(iter(sharding.device_set)).platform)


@functools.lru_cache(maxsize=None)
def jit_keeps_pinned_host(platform: str) -> bool:
    """Whether a jitted step on the default backend (named ``platform``, the cache's key) leaves
    an array in pinned host memory when asked.

    Compiles (never runs) ``device_put(x, Space.Host)`` of a scalar without a sharding of its
    own, the move adamx makes inside a step, and reads where the result lands: XLA:CPU before
    jaxlib 0.10.2 leaves it in device memory without a word.
    """
    del platform
    compiled = jax.jit(lambda x: jax.device_put(x, jax.memory.Space.Host)).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return compiled.output_shardings.memory_kind == "pinned_host"


def _check_jit_keeps_host(caller, platform):
    if platform == jax.default_backend() and not jit_keeps_pinned_host(platform):
        import jaxlib

        raise ValueError(f"{caller}: host-resident moments, but XLA:{platform.upper()} in jaxlib "
                         f"{jaxlib.__version__} keeps no array in pinned host memory inside a "
                         "jitted step (they would silently move to device memory); host offload "
                         "on CPU needs jaxlib >= 0.10.2")


def to_device(moment: Any) -> Any:
    """A moment's arrays in device memory: host-resident ones are streamed in (inside a step)."""
    def move(x):
        if getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host:
            _check_jit_keeps_host("adamx.update", jax.default_backend())
            return jax.device_put(x, jax.memory.Space.Device)
        return x

    return jax.tree.map(move, moment)


def to_memory_of(new: Any, old: Any) -> Any:
    """``new`` back in the memory space of ``old`` (host-resident moments stream back out)."""
    def move(x, y):
        if getattr(jax.typeof(y), "memory_space", None) == jax.memory.Space.Host:
            return jax.device_put(x, jax.memory.Space.Host)
        return x

    return jax.tree.map(move, new, old)
