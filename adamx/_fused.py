""":func:`apply`: the whole Adam step, params included; plain JAX unless ``fused=True`` asks for the
CPU kernel.

The policy lives here: the kernel (``adamx/_native``, built when adamx is installed) runs only
when asked for, and only where it computes exactly what the plain path computes: float32
leaves, Adam, AdamW and NAdam(W) (no AMSGrad or AdaMax), one CPU device. Asked for elsewhere,
it raises and says why; it never falls back silently, and it is never picked behind the caller's
back.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamx import _numerics, _state
from adamx._checks import check_bool, params_like
from adamx._update import Hyperparams, Mask, Rule, decay_flags, step, step_scalars

PyTree = Any


def _kernel_scalars(count, lr, hp, rule):
    """The kernel's float32 scalars, computed exactly as the plain path computes them."""
    s = step_scalars(jnp.float32, count, hp, rule)
    one = jnp.ones([], jnp.float32)
    s["scale"] = jnp.asarray(-lr, jnp.float32)
    # XLA turns the plain path's division by a scalar into this multiplication.
    s["inv_bc1"] = one / s["bc1"]
    s["inv_bc2"] = one / s["bc2"]
    s.setdefault("step_scale", one)
    # The plain path forms these products in float32 before using them.
    s["nesterov_m"] = s["b1"] / s["bc1_next"] if rule.nesterov else one
    s["nesterov_g"] = s["omb1"] / s["bc1"] if rule.nesterov else one
    return s


def _why_not(rule, leaves):
    """Why the kernel cannot run this step, or None when it can."""
    if rule.amsgrad or rule.infinity_norm:
        return "AMSGrad and AdaMax are not in the kernel"
    if rule.param_rounding != "nearest":
        return f"param_rounding={rule.param_rounding!r} is not in the kernel (float32 leaves only)"
    if jax.default_backend() != "cpu":
        return f"the kernel is for CPU, and the default backend is {jax.default_backend()}"
    if jax.device_count() > 1:
        return f"{jax.device_count()} devices: the kernel has no sharding rule"
    for group in leaves:
        if not all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in group):
            return "every param, grad and moment must be a float32 array"
    return None


def _fused_step(fn, grads, state, params, hp, rule, mask):
    from adamx import _native  # loaded only when asked for

    available, why = _native.status()
    g_leaves, treedef, fields = _state.check(fn, state, grads, amsgrad=rule.amsgrad,
                                             kahan=rule.kahan)
    p_leaves = params_like(fn, treedef, grads, params)
    leaves = list(zip(p_leaves, g_leaves, fields["mu"], fields["nu"]))
    why = why if not available else _why_not(rule, leaves)
    if why is not None:
        raise RuntimeError(f"{fn}: fused=True but the CPU kernel cannot run: {why}")
    hp = hp.at(fn, state.count)
    lr = hp.learning_rate
    decay = decay_flags(fn, treedef, grads, params, hp.weight_decay, mask)
    count = _numerics.safe_increment(state.count)
    live = [k for k, g in enumerate(g_leaves) if g.size]  # empty leaves have nothing to update
    new = [list(group[:1]) + list(group[2:]) for group in leaves]
    if live:
        scalars = _kernel_scalars(count, lr, hp, rule)
        results = _native.step({name: scalars[name] for name in _native.SCALARS},
                               [leaves[k] for k in live], [decay[k] for k in live],
                               maximize=rule.maximize, eps_hat=rule.eps_hat,
                               nesterov=rule.nesterov)
        for k, result in zip(live, results):
            new[k] = list(result)
    new_p, new_mu, new_nu = (treedef.unflatten([x[i] for x in new]) for i in range(3))
    return new_p, state.replace(count=count, mu=new_mu, nu=new_nu)


def apply(
    grads: PyTree,
    state: _state.AdamState,
    params: PyTree,
    *,
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask = None,
    eps_hat: bool = False,
    maximize: bool = False,
    nesterov: bool = False,
    amsgrad: bool = False,
    max_bias_corrected: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
    fused: bool = False,
) -> tuple[PyTree, _state.AdamState]:
    r"""One whole Adam step: returns ``(new_params, new_state)``.

    Computes ``optax.apply_updates(params, u)`` with ``u, new_state = adamx.update(grads, state,
    params, ...)``, with the same arguments and checks (see :func:`adamx.update` for the
    equations): by default in plain JAX, on every backend.

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
      learning_rate: A number, an array, or a schedule of the step count before this step.
      b1, b2, eps, eps_root, weight_decay, mask, eps_hat, maximize, nesterov, amsgrad,
        max_bias_corrected, param_rounding, seed: As in :func:`adamx.update`.
      fused: Run the CPU kernel (True) or plain JAX (False, the default).

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
    check_bool(fn, fused=fused)
    rule = Rule(eps_hat=eps_hat, maximize=maximize, nesterov=nesterov, amsgrad=amsgrad,
                max_bias_corrected=max_bias_corrected, param_rounding=param_rounding)
    rule.check(fn)
    hp = Hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay, seed).check(fn)
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
      >>> isinstance(adamx.kernel_available(), bool)
      True
    """
    from adamx import _native

    return _native.status()[0]

