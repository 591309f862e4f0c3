""":func:`apply`: the whole Adam step, params and moments in place, in one CPU kernel.

XLA:CPU makes one loop fusion (one dispatch) per output array, so a plain Adam step costs three
per leaf: 40 bytes per parameter. The ``adam_step`` kernel of ``adamx/_ffi/adam_step.cc`` (see
``adamx/_kernel.py`` for building and when it runs) does the whole step in one multithreaded pass
over all float32 leaves, params and moments updated in place: :func:`apply` returns new params
and state at 28 bytes/param, the least any Adam step can move.

AMSGrad, Adamax, non-float32 leaves, GPU and TPU, several devices and a missing C++ compiler
run the plain JAX path of ``adamx/_update.py``, which is the tests' oracle. The kernel has no
derivative rule, so differentiate through :func:`adamx.update`, not ``apply``. Results agree with
the plain path to float32 rounding (an ulp here and there, from where each compiler forms FMAs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import _kernel, _numerics, _storage
from adamx._checks import check_bool, check_same_structure
from adamx._update import Rule, apply_rule, checked_learning_rate, decay_flags, step_scalars

# Order of the kernel's step-scalar vector (enum Scalar in adam_step.cc).
_SCALAR_ORDER = ("scale", "b1", "omb1", "b2", "omb2", "eps", "eps_root", "weight_decay",
                 "inv_bc1", "inv_bc2", "step_scale", "nesterov_m", "nesterov_g")
# Flags of the adam_step kernel (enum Flag in adam_step.cc).
_MAXIMIZE, _EPS_HAT, _NESTEROV = 1, 2, 4


def _unsupported(g_leaves, mu_leaves, nu_leaves, p_leaves, state, rule):
    """Why the kernel cannot run this step, or None when it can."""
    if state.nu_max is not None:
        return "AMSGrad states (nu_max) are not supported"
    if rule.infinity_norm or rule.max_bias_corrected:
        return "Adamax and max_bias_corrected are not supported"
    for leaves in (g_leaves, mu_leaves, nu_leaves, p_leaves):
        if not all(_kernel.is_f32(x) for x in leaves):
            return "every param, grad and moment must be a float32 array"
    return None


def _kernel_step(g_leaves, mu_leaves, nu_leaves, p_leaves, decay, scalars, rule):
    """Runs the custom calls (leaves of any shape); returns flat lists (params, mu, nu).

    Empty leaves have nothing to update and are passed through without entering a call.
    """
    live = [k for k, g in enumerate(g_leaves) if np.size(g)]
    new_p, new_mu, new_nu = list(p_leaves), list(mu_leaves), list(nu_leaves)
    flags = ((_MAXIMIZE if rule.maximize else 0) | (_EPS_HAT if rule.eps_hat else 0)
             | (_NESTEROV if rule.nesterov else 0))
    for start in range(0, len(live), _kernel.GROUP):
        group = live[start:start + _kernel.GROUP]
        operands = [scalars]
        for k in group:
            operands += [p_leaves[k], g_leaves[k], mu_leaves[k], nu_leaves[k]]
        result_types = [jax.ShapeDtypeStruct(np.shape(g_leaves[k]), jnp.float32)
                        for k in group for _ in range(3)]
        # Operands 1 + 4j (param), 3 + 4j (mu) and 4 + 4j (nu) are updated in place as the
        # leaf's results 3j, 3j + 1 and 3j + 2.
        aliases = {}
        for j in range(len(group)):
            aliases.update({1 + 4 * j: 3 * j, 3 + 4 * j: 3 * j + 1, 4 + 4 * j: 3 * j + 2})
        call = jax.ffi.ffi_call(_kernel.STEP_TARGET, result_types, input_output_aliases=aliases,
                                vmap_method="sequential")
        out = call(*operands, flags=np.int64(flags),
                   decay=np.asarray([decay[k] for k in group], np.int32),
                   chunk=np.int64(_kernel.CHUNK))
        for j, k in enumerate(group):
            new_p[k], new_mu[k], new_nu[k] = out[3 * j: 3 * j + 3]
    return new_p, new_mu, new_nu


def _kernel_scalars(count, scale, *, b1, b2, eps, eps_root, weight_decay, rule):
    """The kernel's float32 scalar vector, computed exactly as the plain path computes them."""
    s = step_scalars(jnp.float32, count, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     weight_decay=weight_decay, rule=rule)
    # scale None (scale_by_adam) returns the direction itself: times 1 is exact.
    s["scale"] = jnp.asarray(1.0 if scale is None else scale, jnp.float32)
    one = jnp.ones([], jnp.float32)
    # XLA:CPU turns the plain path's division by a scalar into this multiplication.
    s["inv_bc1"] = one / s["bc1"]
    s["inv_bc2"] = one / s.get("bc2", one)
    s.setdefault("step_scale", one)
    if rule.nesterov:
        # The plain path casts these products to float32 after forming them in float32.
        s["nesterov_m"] = s["b1"] / s["bc1_next"]
        s["nesterov_g"] = s["omb1"] / s["bc1"]
    return jnp.stack([jnp.asarray(s.get(k, one), jnp.float32) for k in _SCALAR_ORDER])


def apply(
    grads,
    state,
    params,
    *,
    learning_rate,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=0.0,
    mask=None,
    eps_hat=False,
    maximize=False,
    nesterov=False,
    fused=None,
):
    r"""One whole Adam step: returns ``(new_params, new_state)``.

    Computes ``optax.apply_updates(params, u)`` with ``u, new_state = adamx.update(grads, state,
    params, ...)``, with the same arguments and checks (see :func:`adamx.update` for the
    equations). On CPU with float32 leaves it runs one multithreaded kernel over all leaves, in
    place when the caller's ``jax.jit`` donates ``params`` and ``state`` (``donate_argnums``;
    without donation XLA copies them first, so inputs are never clobbered); results match the
    plain path to float32 rounding. Elsewhere it runs the plain JAX path (the default on GPU
    and TPU).

    Args:
      grads: Gradients, with the structure and shapes of ``params``.
      state: An :class:`adamx.AdamState` (from :func:`adamx.init`, without ``amsgrad`` for the
        kernel).
      params: The current params.
      learning_rate: A number, an array, or a schedule of the step count before this step.
      b1, b2, eps, eps_root, weight_decay, mask, eps_hat, maximize, nesterov: As in
        :func:`adamx.update`.
      fused: None picks the kernel when it applies; False always runs the plain path; True
        raises instead of falling back.

    Returns:
      ``(new_params, new_state)``, with the dtypes and structures of ``params`` and ``state``.

    Raises:
      ValueError: As :func:`adamx.update` does (hyperparameter ranges, structure mismatches).
      TypeError: For a non-number hyperparameter or a state that is not an AdamState.
      RuntimeError: If ``fused=True`` and the kernel is unavailable or these leaves/options
        are unsupported (the message says which).

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
    rule = Rule(eps_hat, maximize, nesterov)
    if fused is not None:
        check_bool(fn, fused=fused)
    hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
    lr = checked_learning_rate(fn, state, learning_rate, rule, **hyper)

    def plain():
        updates, new_state = apply_rule(fn, grads, state, params, scale=-lr, mask=mask, rule=rule,
                                        **hyper)
        return optax.apply_updates(params, updates), new_state

    if fused is False:
        return plain()
    g_leaves, mu_leaves, treedef = check_same_structure(
        fn, grads, state.mu, is_leaf=_storage.is_moment_leaf)
    nu_leaves = jax.tree.leaves(state.nu, is_leaf=_storage.is_moment_leaf)
    p_leaves = treedef.flatten_up_to(params)
    available, why = _kernel.kernel_here()
    if available:
        why = _unsupported(g_leaves, mu_leaves, nu_leaves, p_leaves, state, rule)
    if why is not None or not g_leaves:
        if fused:
            raise RuntimeError(f"{fn}: fused=True but the kernel cannot run: {why or 'no leaves'}")
        return plain()
    decay = decay_flags(fn, treedef, grads, params, weight_decay, mask)
    count = _numerics.safe_increment(state.count)
    scalars = _kernel_scalars(count, -lr, rule=rule, **hyper)
    new_p, new_mu, new_nu = _kernel_step(g_leaves, mu_leaves, nu_leaves, p_leaves, decay,
                                         scalars, rule)
    new_state = state.replace(count=count, mu=treedef.unflatten(new_mu),
                              nu=treedef.unflatten(new_nu))
    return treedef.unflatten(new_p), new_state
