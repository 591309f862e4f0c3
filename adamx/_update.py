"""Adam's update: the math for one leaf, lifted once to pytrees, and the public :func:`update`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _kernel, _numerics, _storage
from adamx._checks import (
    check_bool,
    check_in_unit_interval,
    check_learning_rate,
    check_non_negative,
    check_same_structure,
    concrete_float,
)
from adamx._state import AdamState


@dataclasses.dataclass(frozen=True)
class Rule:
    """Static choices of the update rule (which variant of Adam), fixed at trace time."""

    eps_hat: bool = False
    maximize: bool = False
    nesterov: bool = False
    max_bias_corrected: bool = False
    infinity_norm: bool = False


def check_rule(fn, rule):
    """Rejects option combinations that have no defined meaning."""
    check_bool(fn, **dataclasses.asdict(rule))
    if rule.eps_hat and rule.max_bias_corrected:
        raise ValueError(
            f"{fn}: eps_hat=True uses the raw second moment, so it cannot be combined with "
            "max_bias_corrected=True (the maximum of the bias-corrected one)"
        )


def check_hyperparams(fn, *, b1, b2, eps, eps_root=0.0, weight_decay=0.0):
    """Range checks shared by every entry point (concrete values only; tracers pass)."""
    check_in_unit_interval(fn, b1=b1, b2=b2)
    check_non_negative(fn, eps=eps, eps_root=eps_root, weight_decay=weight_decay)


def step_scalars(dtype, t, *, b1, b2, eps, eps_root, weight_decay, rule):
    """Per-dtype scalars, computed once per step rather than once per leaf."""
    omb1, omb2 = _numerics.one_minus(b1), _numerics.one_minus(b2)
    s = {
        "b1": b1, "omb1": omb1, "b2": b2, "omb2": omb2,
        "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay,
        # Bias corrections in float32 or wider: 1 - 0.999**t in bfloat16 rounds to 0 or 1.
        "bc1": _numerics.bias_correction(omb1, t, dtype),
    }
    if rule.nesterov:
        s["bc1_next"] = _numerics.bias_correction(omb1, _numerics.safe_increment(t), dtype)
    if not rule.infinity_norm:
        s["bc2"] = _numerics.bias_correction(omb2, t, dtype)
        if rule.eps_hat:
            s["step_scale"] = jnp.sqrt(s["bc2"])
    return {k: jnp.asarray(v, dtype) for k, v in s.items()}


def _leaf_update(g, mu, nu, nu_max, p, decay, scale, s, rule, moments=None):
    """One leaf of Adam, in the compute dtype; returns (update, mu, nu, nu_max) as stored.

    ``moments``: this step's (m, v) when the CPU kernel has already computed them.
    """
    real = s["b1"].dtype
    g = jnp.asarray(g, _numerics.complex_dtype(real) if jnp.iscomplexobj(g) else real)
    if rule.maximize:
        g = -g
    if moments is not None:
        m, v = moments
    else:
        m = _storage.load(mu, g.dtype)
        v = _storage.load(nu, real)
        m = s["omb1"].astype(g.dtype) * g + s["b1"].astype(g.dtype) * m
        if rule.infinity_norm:
            v = jnp.maximum(jnp.abs(g) + s["eps"], s["b2"] * v)
        else:
            v = s["omb2"] * _numerics.abs_sq(g) + s["b2"] * v

    if rule.nesterov:
        m_hat = (s["b1"] / s["bc1_next"]).astype(g.dtype) * m + (s["omb1"] / s["bc1"]).astype(
            g.dtype
        ) * g
    else:
        m_hat = m / s["bc1"].astype(g.dtype)

    v_used, new_max = v, None
    if nu_max is not None:
        previous = _storage.load(nu_max, real)
        if rule.max_bias_corrected:
            new_max = jnp.maximum(previous, v / s["bc2"])
        else:
            new_max = jnp.maximum(previous, v)
        v_used = new_max

    if rule.infinity_norm:
        direction = m_hat / v_used.astype(g.dtype)
    elif rule.eps_hat:
        denom = jnp.sqrt(v_used + s["eps_root"]) + s["eps"]
        direction = m_hat * (s["step_scale"] / denom).astype(g.dtype)
    else:
        v_hat = v_used if rule.max_bias_corrected else v_used / s["bc2"]
        direction = m_hat / (jnp.sqrt(v_hat + s["eps_root"]) + s["eps"]).astype(g.dtype)

    if decay:
        direction = direction + s["weight_decay"].astype(g.dtype) * p.astype(g.dtype)
    if scale is not None:
        direction = scale.astype(g.dtype) * direction
    stored_max = None if nu_max is None else _storage.store(new_max, nu_max)
    return direction, _storage.store(m, mu), _storage.store(v, nu), stored_max


def _kernel_moments(g_leaves, mu_leaves, nu_leaves, s, rule):
    """Per leaf, this step's (m, v) from the CPU moment kernel, or None for the plain path.

    The kernel takes the non-empty leaves whose grad and both moments are float32 arrays, when
    it runs here at all (see ``adamx/_kernel.py``). Adamax's second moment is a maximum, not a
    moving average, and maximize=True negates g first (GCC and XLA then contract the moment's
    multiply-add into different FMAs): both stay on the plain path.
    """
    found = [None] * len(g_leaves)
    if s is None or rule.infinity_norm or rule.maximize or not _kernel.kernel_here()[0]:
        return found
    picked = [k for k, leaf in enumerate(zip(g_leaves, mu_leaves, nu_leaves))
              if all(map(_kernel.is_f32, leaf)) and np.size(leaf[0])]
    if not picked:
        return found
    new_m, new_v = _kernel.moments(
        [g_leaves[k] for k in picked], [mu_leaves[k] for k in picked],
        [nu_leaves[k] for k in picked],
        b1=s["b1"], omb1=s["omb1"], b2=s["b2"], omb2=s["omb2"])
    for k, m, v in zip(picked, new_m, new_v):
        found[k] = (m, v)
    return found


def decay_flags(fn, treedef, grads, params, weight_decay, mask):
    """Per-leaf booleans: which leaves get weight decay."""
    if concrete_float(fn, "weight_decay", weight_decay) == 0:
        return [False] * treedef.num_leaves
    if params is None:
        raise ValueError(
            f"{fn}: weight decay needs the params: call update(grads, state, params)"
        )
    if mask is None:
        return [True] * treedef.num_leaves
    mask_tree = mask(params) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask_tree, grads)
    except ValueError as e:
        raise ValueError(
            f"{fn}: mask must have the params' tree structure (or a prefix): {e}"
        ) from None
    flags = treedef.flatten_up_to(full)
    for flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{fn}: mask leaves must be Python bools, got {flag!r}")
    return [bool(f) for f in flags]


def apply_rule(
    fn, grads, state, params, *, scale, b1, b2, eps, eps_root, weight_decay, mask, rule
):
    """The single implementation behind :func:`update` and every optax factory.

    Args:
      fn: The public name used in error messages.
      scale: Multiplies the final update (``-learning_rate``), or None to return the direction.
      (the rest: see :func:`update`)

    Returns:
      ``(updates, new_state)``.
    """
    if rule.max_bias_corrected and state.nu_max is None:
        raise ValueError(
            f"{fn}: max_bias_corrected=True needs an AMSGrad state (adamx.init(..., amsgrad=True))"
        )
    if rule.infinity_norm and state.nu_max is not None:
        raise ValueError(f"{fn}: AdaMax keeps no nu_max, but the state has one (amsgrad=True)")
    g_leaves, mu_leaves, treedef = check_same_structure(
        fn, grads, state.mu, is_leaf=_storage.is_moment_leaf
    )
    nu_leaves = jax.tree.leaves(state.nu, is_leaf=_storage.is_moment_leaf)
    if state.nu_max is None:
        max_leaves = [None] * len(g_leaves)
    else:
        max_leaves = jax.tree.leaves(state.nu_max, is_leaf=_storage.is_moment_leaf)
    decay = decay_flags(fn, treedef, grads, params, weight_decay, mask)
    p_leaves = treedef.flatten_up_to(params) if any(decay) else [None] * len(g_leaves)

    count = _numerics.safe_increment(state.count)
    scalars = {}
    for g in g_leaves:
        dtype = _numerics.compute_dtype(jnp.result_type(g))
        if dtype not in scalars:
            scalars[dtype] = step_scalars(
                dtype, count, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                weight_decay=weight_decay, rule=rule,
            )
    moments = _kernel_moments(g_leaves, mu_leaves, nu_leaves, scalars.get(jnp.dtype(jnp.float32)),
                              rule)
    outputs = []
    leaves = zip(g_leaves, mu_leaves, nu_leaves, max_leaves, p_leaves, decay, moments)
    for g, mu, nu, nu_max, p, d, mv in leaves:
        dtype = _numerics.compute_dtype(jnp.result_type(g))
        leaf_scale = None if scale is None else jnp.asarray(scale, dtype)
        u, mu, nu, nu_max = _leaf_update(g, mu, nu, nu_max, p, d, leaf_scale, scalars[dtype], rule,
                                         mv)
        outputs.append((u.astype(jnp.result_type(g)), mu, nu, nu_max))

    def rebuild(i):
        return treedef.unflatten([o[i] for o in outputs])

    new_state = AdamState(
        count=count,
        mu=rebuild(1),
        nu=rebuild(2),
        nu_max=None if state.nu_max is None else rebuild(3),
    )
    return rebuild(0), new_state


def resolve_learning_rate(learning_rate, count):
    """A schedule is called with the step count before this step, as optax does."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def checked_learning_rate(fn, state, learning_rate, rule, **hyperparams):
    """The checks of a direct call (:func:`update`, :func:`adamx.apply`); returns this step's rate."""
    check_rule(fn, rule)
    check_learning_rate(fn, learning_rate)
    check_hyperparams(fn, **hyperparams)
    if not isinstance(state, AdamState):
        raise TypeError(f"{fn}: state must be an adamx.AdamState, got {type(state).__name__}")
    return resolve_learning_rate(learning_rate, state.count)


def update(
    grads,
    state,
    params=None,
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
    max_bias_corrected=False,
):
    r"""One Adam step: returns the updates to add to the params, and the new state.

    For each leaf, with :math:`t` the step count after this step:

    .. math::

      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2 \\
      \hat m_t &= m_t / (1 - \beta_1^t), \quad \hat v_t = v_t / (1 - \beta_2^t) \\
      u_t &= -\eta \left(\hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
             + \lambda\, \theta_{t-1}\right)

    The math runs in float32 (float64 for float64 leaves); updates come back in the gradients'
    dtype. Every numeric hyperparameter may be a Python number or a JAX array, so a value
    passed as an argument of a jitted step changes without recompiling.

    Args:
      grads: Gradients, with the tree structure and shapes of the params.
      state: The :class:`AdamState` from :func:`adamx.init` or a previous step.
      params: The current params; needed only for weight decay.
      learning_rate: :math:`\eta`: a number, an array, or a schedule (a callable of the step
        count before this step).
      b1: :math:`\beta_1`, the first moment's decay, in [0, 1).
      b2: :math:`\beta_2`, the second moment's decay, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment; >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root; >= 0.
      weight_decay: :math:`\lambda`, decoupled weight decay as in AdamW; >= 0.
      mask: Which leaves get weight decay: a pytree of bools (the params' structure or a
        prefix of it) or a callable of the params returning one. None decays all leaves.
      eps_hat: Use Kingma & Ba's :math:`\hat\epsilon` form (as Keras and TensorFlow do):
        :math:`u_t = -\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t) \cdot m_t / (\sqrt{v_t} + \epsilon)`.
      maximize: Ascend the objective (negates the gradients on entry, as PyTorch does).
      nesterov: NAdam, in optax's form.
      max_bias_corrected: For an AMSGrad state, take the maximum of the bias-corrected
        second moment (optax) instead of the raw one (PyTorch and Keras).

    Returns:
      ``(updates, new_state)``.

    Raises:
      ValueError: For a hyperparameter out of range, grads whose structure or shapes differ from
        the state (naming the first differing key path), or weight decay without params.
      TypeError: For a hyperparameter that is not a number.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = adamx.init(params)
      >>> grads = {"w": jnp.array([0.5, -0.5])}
      >>> updates, state = adamx.update(grads, state, learning_rate=0.1)
      >>> updates["w"]  # the first step moves each coordinate by about learning_rate
      Array([-0.1,  0.1], dtype=float32)
      >>> optax.apply_updates(params, updates)["w"]
      Array([ 0.9, -1.9], dtype=float32)
    """
    fn = "adamx.update"
    rule = Rule(eps_hat, maximize, nesterov, max_bias_corrected)
    lr = checked_learning_rate(fn, state, learning_rate, rule, b1=b1, b2=b2, eps=eps,
                               eps_root=eps_root, weight_decay=weight_decay)
    return apply_rule(
        fn, grads, state, params, scale=-lr, b1=b1, b2=b2,
        eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask, rule=rule,
    )
