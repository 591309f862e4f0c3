""":func:`apply`: the whole Adam step, params included; plain JAX unless ``fused=True`` asks for the
CPU kernel.

The policy lives here: the kernel (``adamx/_native``, built when adamx is installed) runs only
when asked for, and only where it computes what the plain path computes: float32 leaves, Adam,
AdamW and NAdam(W) (no AMSGrad or AdaMax), arrays on one CPU device. Asked for elsewhere, it
raises and says why; it never falls back silently, and it is never picked behind the caller's
back.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adamx import _options, _state
from adamx._checks import check_bool
from adamx._update import Prepared, Rule, prepare, scalars, step

PyTree = Any


def kernel_scalars(count: jax.Array, hp: _options.Hyperparams, rule: Rule) -> dict:
    """The kernel's float32 scalars by their ABI names (``adamx/_native/abi.h``), computed from
    the plain path's own :class:`adamx._update.Scalars`, as the plain path uses them."""
    s = scalars(jnp.float32, count, hp, rule)
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
    if rule.param_rounding != "nearest":
        return f"param_rounding={rule.param_rounding!r} is not in the kernel (float32 leaves only)"
    if not (rule.bias_correction_mu and rule.bias_correction_nu):
        return "turning bias correction off is not in the kernel"
    arrays = [x for leaf in zip(prepared.params, prepared.grads, prepared.stored)
              for x in (leaf[0], leaf[1], leaf[2].mu, leaf[2].nu)]
    if not all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in arrays):
        return "every param, grad and moment must be a float32 array"
    placements = {_placement(x) for x in arrays}
    if any(count > 1 for count, _ in placements):
        return "the arrays are sharded over several devices: the kernel has no sharding rule"
    platforms = {platform for _, platform in placements}
    if platforms != {"cpu"}:
        return f"the kernel is for CPU, and the arrays are on {', '.join(sorted(platforms))}"
    return None


def _placement(x: jax.Array) -> tuple[int, str]:
    """``(number of devices, platform)`` of an array; for a tracer, from the mesh its type names
    (none: one device of the default backend, where a jitted step without shardings runs)."""
    if not isinstance(x, jax.core.Tracer):
        devices = x.sharding.device_set
        return len(devices), next(iter(devices)).platform
    mesh = jax.typeof(x).sharding.mesh
    return (1 if mesh.empty else mesh.size), jax.default_backend()


def _fused_step(fn, grads, state, params, hp, rule, mask):
    from adamx import _native  # loaded only when asked for

    available, why = _native.status()
    prepared = prepare(fn, grads, state, params, hp, rule, mask)
    why = why if not available else _why_not(rule, prepared)
    if why is not None:
        raise RuntimeError(f"{fn}: fused=True but the CPU kernel cannot run: {why}")
    leaves = [(p, g, s.mu, s.nu) for p, g, s in zip(prepared.params, prepared.grads,
                                                      prepared.stored)]
    new = [(p, m, v) for p, _, m, v in leaves]
    nonempty = [k for k, g in enumerate(prepared.grads) if g.size]
    if nonempty:
        results = _native.step(kernel_scalars(prepared.count, prepared.hp, rule),
                               [leaves[k] for k in nonempty],
                               [prepared.decay[k] for k in nonempty],
                               maximize=rule.maximize, eps_hat=rule.eps_hat,
                               nesterov=rule.nesterov)
        for k, result in zip(nonempty, results):
            new[k] = result
    new_p, new_mu, new_nu = (prepared.treedef.unflatten([x[i] for x in new]) for i in range(3))
    return new_p, state.replace(count=prepared.count, mu=new_mu, nu=new_nu)


def apply(grads: PyTree, state: _state.AdamState, params: PyTree, *, fused: bool = False,
          **options: Any) -> tuple[PyTree, _state.AdamState]:
    r"""One whole Adam step: returns ``(new_params, new_state)``.

    Computes ``optax.apply_updates(params, u)`` with ``u, new_state = adamx.update(grads, state,
    params, **options)``, with the same options and checks (see :func:`adamx.update`): by default
    in plain JAX, on every backend.

    ``fused=True`` runs the step in one multithreaded XLA:CPU kernel over all leaves, params and
    moments updated in place when the caller's ``jax.jit`` donates ``params`` and ``state``
    (``donate_argnums``; without donation XLA copies them first, so inputs are never
    clobbered): 28 bytes per parameter, the least an Adam step can move. It is built when adamx
    is installed (see :func:`adamx.kernel_available`) and takes float32 leaves on one CPU
    device, without AMSGrad or AdaMax; it has no derivative rule (differentiate through
    :func:`adamx.update`). Results agree with the plain path to a few float32 ulps, where XLA
    fuses a multiply-add that the kernel rounds twice, and the kernel gives the same bits on
    every x86-64 CPU.

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
        not built, a non-float32 leaf, an unsupported option, several devices, not a CPU).

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
    fn = "adamx.apply"
    check_bool(fn, "fused", fused)
    hp, rule, mask = _options.parse(fn, options)
    if params is None:
        raise TypeError(f"{fn}: params must be the params' pytree (apply returns the new params), "
                        "got None")
    if fused:
        return _fused_step(fn, grads, state, params, hp, rule, mask)
    updates, new_state = step(fn, grads, state, params, hp, rule, mask)
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
