""":func:`apply`: the whole Adam step, params included; plain JAX unless ``fused=True`` asks for the
CPU kernel.

The policy lives here: the kernel (``adamx/_native``, built when adamx is installed) runs only
when asked for, and only where it computes what the plain path computes: float32 and bfloat16
params (bfloat16 with any ``param_rounding``), moments stored as float32, bfloat16, int8 or int4,
Adam, AdamW and NAdam(W) (no AMSGrad or AdaMax), arrays on one CPU device. Asked for elsewhere, it
raises and says why; it never falls back silently, and it is never picked behind the caller's
back.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import _formats, _numerics, _options, _state, _storage
from adamx._checks import check_bool, keystr, short
from adamx._sharding import to_device, to_memory_of
from adamx._update import Prepared, Rule, prepare, scalars, step

PyTree = Any

_PARAMS = (jnp.float32, jnp.bfloat16)  # the params' dtypes in the kernel
_FIRST = (_formats.Int8Blocks, _formats.Int4Blocks)  # the quantized formats of mu in the kernel
_SECOND = (_formats.Int8Blocks, _formats.Int4Rank1)  # and of nu


def kernel_scalars(count: jax.Array, hyperparams: _options.Hyperparams, rule: Rule) -> dict:
    """The kernel's float32 scalars by their ABI names (``adamx/_native/abi.h``), computed from
    the plain path's own :class:`adamx._update.Scalars`, as the plain path uses them."""
    s = scalars(jnp.float32, count, hyperparams, rule)
    one = jnp.ones([], jnp.float32)
    return {
        "scale": -s.learning_rate, "b1": s.b1, "omb1": s.one_minus_b1, "b2": s.b2,
        "omb2": s.one_minus_b2, "eps": s.eps, "eps_root": s.eps_root,
        "weight_decay": s.weight_decay,
        # XLA turns the plain path's division by a scalar into this multiplication
        "inv_bc1": one / s.bias_correction1, "inv_bc2": one / s.bias_correction2,
        "step_scale": jnp.sqrt(s.bias_correction2) if rule.eps_hat else one,
        # the plain path forms these products in float32 before using them
        "nesterov_m": s.b1 / s.next_bias_correction1 if rule.nesterov else one,
        "nesterov_g": s.one_minus_b1 / s.bias_correction1 if rule.nesterov else one,
    }


def _why_not(rule: Rule, prepared: Prepared) -> Any:
    """Why the kernel cannot run this step, or None when it can."""
    if rule.amsgrad or rule.adamax:
        return "AMSGrad and AdaMax are not in the kernel"
    arrays = []
    for path, g, p, leaf in zip(prepared.paths, prepared.grads, prepared.params, prepared.stored):
        if not _storage.has_moments(g):
            continue  # an integer or boolean param is not trained: it stays as it is
        where = keystr(path)
        if not (isinstance(p, jax.Array) and isinstance(g, jax.Array)):
            return f"params{where} and grads{where} must be arrays, got {short(p)}, {short(g)}"
        if p.dtype not in _PARAMS or g.dtype != p.dtype:
            return (f"params{where} is {short(p)} and grads{where} {short(g)}: the kernel takes "
                    "float32 and bfloat16 params, with grads of their dtype")
        for name, moment, formats in (("mu", leaf.mu, _FIRST), ("nu", leaf.nu, _SECOND)):
            if not (isinstance(moment, formats) or (
                    isinstance(moment, jax.Array) and moment.dtype in (jnp.float32, jnp.bfloat16))):
                return (f"state.{name}{where} is {_storage.described(moment)}: the kernel stores moments as "
                        "float32, bfloat16, int8 or int4")
        arrays += [p, g, *jax.tree.leaves((leaf.mu, leaf.nu, leaf.compensation))]
    placements = {_placement(x) for x in arrays}
    if any(count > 1 for count, _ in placements):
        return ("the arrays are sharded over several devices, and the kernel has no sharding "
                "rule: run the step on one device's arrays (inside shard_map, each device's)")
    platforms = {platform for _, platform in placements}
    if platforms - {"cpu"}:
        return f"the kernel is for CPU, and the arrays are on {', '.join(sorted(platforms))}"
    return None


def _placement(x: jax.Array) -> tuple[int, str]:
    """``(number of devices, platform)`` of an array: for a tracer, those of the mesh its type
    names (the axes a ``shard_map`` has made manual not counted: each device runs its own step);
    none: one device of the default backend, where a jitted step without shardings runs."""
    if not isinstance(x, jax.core.Tracer):
        devices = x.sharding.device_set
        return len(devices), next(iter(devices)).platform
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty:
        return 1, jax.default_backend()
    manual = getattr(jax.sharding.AxisType, "Manual", None)
    sizes = [size for size, kind in zip(mesh.axis_sizes, mesh.axis_types) if kind != manual]
    return int(np.prod(sizes, dtype=int)), getattr(mesh, "_platform", None) or jax.default_backend()


def _fused_step(caller, grads, state, params, hyperparams, rule, mask):
    from adamx import _native  # loaded only when asked for

    available, why = _native.status()
    prepared = prepare(caller, grads, state, params, hyperparams, rule, mask)
    why = why if not available else _why_not(rule, prepared)
    if why is not None:
        raise RuntimeError(f"{caller}: fused=True but the CPU kernel cannot run: {why}")
    count, hyperparams = prepared.count, prepared.hyperparams
    keys = _numerics.leaf_keys(hyperparams.seed, count, prepared.paths)  # the plain path's
    new = list(zip(prepared.params, prepared.stored))  # untrained and empty leaves stay as they are
    trained, leaves = [], []
    for k, (g, p, leaf, decay) in enumerate(zip(prepared.grads, prepared.params, prepared.stored,
                                               prepared.decay)):
        if not _storage.has_moments(g) or not g.size:
            continue
        rounds = _numerics.rounds(p.dtype, rule.param_rounding)
        mu, nu, c = (to_device(x) for x in (leaf.mu, leaf.nu, leaf.compensation))
        trained.append(k)
        leaves.append(_native.Leaf(p, g, mu, nu, c, rule.param_rounding if rounds else "nearest",
                                   decay, keys[:, k]))
    if leaves:
        results = _native.step(kernel_scalars(count, hyperparams, rule), leaves,
                               maximize=rule.maximize, eps_hat=rule.eps_hat, nesterov=rule.nesterov)
        for k, (p, mu, nu, c) in zip(trained, results):
            old = prepared.stored[k]
            new[k] = (p, old._replace(mu=to_memory_of(mu, old.mu), nu=to_memory_of(nu, old.nu),
                                      compensation=to_memory_of(c, old.compensation)))
    treedef = prepared.treedef
    fields = {name: None if getattr(state, name) is None else
              treedef.unflatten([getattr(leaf, name) for _, leaf in new])
              for name in _state.LEAF_FIELDS}
    return treedef.unflatten([p for p, _ in new]), _state.AdamState(count, **fields)


def apply(grads: PyTree, state: _state.AdamState, params: PyTree, *, fused: bool = False,
          **options: Any) -> tuple[PyTree, _state.AdamState]:
    r"""One whole Adam step: returns ``(new_params, new_state)``.

    Computes ``optax.apply_updates(params, u)`` with ``u, new_state = adamx.update(grads, state,
    params, **options)``, with the same options and checks (see :func:`adamx.update`): by default
    in plain JAX, on every backend.

    ``fused=True`` runs the step in one multithreaded XLA:CPU kernel over all leaves, params and
    moments updated in place when the caller's ``jax.jit`` donates ``params`` and ``state``
    (``donate_argnums``; without donation XLA copies them first, so inputs are never
    clobbered): for float32 leaves 28 bytes per parameter, the least an Adam step can move. It is
    built when adamx is installed (see :func:`adamx.kernel_available`) and takes float32 and
    bfloat16 params (bfloat16 with any ``param_rounding``), moments stored as float32, bfloat16,
    ``"int8"`` or ``"int4"``, on one CPU device (inside ``shard_map``, each device's), without
    AMSGrad or AdaMax; it has no derivative rule (differentiate through :func:`adamx.update`). It
    draws the plain path's random bits and computes its operations in its order; where XLA fuses
    a multiply-add that the kernel rounds twice, values differ by a float32 ulp, and a quantized
    or bfloat16 moment then rounds, now and then, to the neighbouring value
    (``tests/test_fused.py`` states the bounds). The kernel gives the same bits on every x86-64
    CPU.

    Args:
      grads: Gradients, with the structure and shapes of ``params``.
      state: An :class:`adamx.AdamState`.
      params: The current params.
      fused: Run the CPU kernel (True) or plain JAX (False, the default).
      **options: The options of :func:`adamx.update` (``learning_rate`` required).

    Returns:
      ``(new_params, new_state)``, with the dtypes and structures of ``params`` and ``state``.

    Raises:
      ValueError, TypeError: As :func:`adamx.update` raises them.
      RuntimeError: If ``fused=True`` and the kernel cannot run this step (the message says why:
        not built, a dtype or storage it does not take, AMSGrad or AdaMax, arrays sharded over
        several devices, not a CPU).

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = adamx.init(params)
      >>> step = jax.jit(lambda p, s, g: adamx.apply(g, s, p, learning_rate=0.1),
      ...                donate_argnums=(0, 1))
      >>> params, state = step(params, state, {"w": jnp.array([0.5, -0.5])})
      >>> params["w"]
      Array([ 0.9, -1.9], dtype=float32)
    """
    caller = "adamx.apply"
    check_bool(caller, "fused", fused)
    hyperparams, rule, mask = _options.parse(caller, options)
    if params is None:
        raise TypeError(f"{caller}: params must be the params' pytree (apply returns the new params), "
                        "got None")
    if fused:
        return _fused_step(caller, grads, state, params, hyperparams, rule, mask)
    updates, new_state = step(caller, grads, state, params, hyperparams, rule, mask)
    return optax.apply_updates(params, updates), new_state


def kernel_available() -> bool:
    """Whether ``adamx.apply(..., fused=True)`` can run its CPU kernel here.

    The kernel is compiled when adamx is installed from source with a C++ compiler; nothing is
    compiled or written at run time. Calling this loads and registers it.

    Returns:
      True when the kernel is built and registered with XLA:CPU.

    Example:
      >>> import adamx
      >>> adamx.kernel_available()  # built when adamx was installed with a C++ compiler
      True
    """
    from adamx import _native

    return _native.status()[0]
