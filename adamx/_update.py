"""Adam's update: the math for one leaf, lifted once to pytrees, and the public :func:`update`.

Plain JAX only: nothing here dispatches to native code, reads a file or a global switch, so
every step traces to the same computation on every backend and exports with ``jax.export``.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from adamx import _numerics, _state, _storage
from adamx._sharding import like, to_device
from adamx._checks import (
    check_bool,
    check_choice,
    check_in_unit_interval,
    check_non_negative,
    check_rate,
    check_seed,
    concrete_float,
    params_like,
    scheduled,
)

PyTree = Any
Mask = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Static choices of the update rule (which variant of Adam), fixed at trace time."""

    eps_hat: bool = False
    maximize: bool = False
    nesterov: bool = False
    amsgrad: bool = False
    max_bias_corrected: bool = False
    infinity_norm: bool = False
    param_rounding: str = "nearest"

    def check(self, fn):
        """Rejects values and combinations that have no defined meaning."""
        check_bool(fn, **{k: v for k, v in dataclasses.asdict(self).items()
                          if k != "param_rounding"})
        check_choice(fn, "param_rounding", self.param_rounding, _numerics.ROUNDINGS)
        if self.max_bias_corrected and not self.amsgrad:
            raise ValueError(f"{fn}: max_bias_corrected=True is an AMSGrad option (amsgrad=True)")
        if self.eps_hat and self.max_bias_corrected:
            raise ValueError(
                f"{fn}: eps_hat=True uses the raw second moment, so it cannot be combined with "
                "max_bias_corrected=True (the maximum of the bias-corrected one)"
            )

    @property
    def kahan(self):
        return self.param_rounding == "kahan"


class Hyperparams(NamedTuple):
    """The numeric hyperparameters: each a Python number or a (possibly traced) array.

    The one list of them: :func:`update`, :func:`adamx.apply` and every factory build one of
    these, :meth:`check` validates it, and :func:`step` reads it.
    """

    learning_rate: Any  # a number, an array, a schedule, or None for scale_by_adam
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    eps_root: Any = 0.0
    weight_decay: Any = 0.0  # a number, an array or a schedule
    seed: Any = 0

    def check(self, fn, *, scaled=True):
        """Range checks of concrete values; tracers pass (``check_hyperparams`` checks those).

        ``scaled=False`` is for ``scale_by_adam``, which has no learning rate (None).
        """
        if scaled:
            check_rate(fn, "learning_rate", self.learning_rate)
        check_in_unit_interval(fn, b1=self.b1, b2=self.b2)
        check_non_negative(fn, eps=self.eps, eps_root=self.eps_root)
        check_rate(fn, "weight_decay", self.weight_decay)
        check_seed(fn, self.seed)
        return self

    def at(self, fn, count):
        """The values at the step whose count (before the step) is ``count``: the learning rate
        and weight decay schedules called, and what they return checked."""
        return self._replace(
            learning_rate=scheduled(fn, "learning_rate", self.learning_rate, count),
            weight_decay=scheduled(fn, "weight_decay", self.weight_decay, count))


def step_scalars(dtype, t, hp, rule):
    """Per-dtype scalars, computed once per step rather than once per leaf."""
    omb1, omb2 = _numerics.one_minus(hp.b1), _numerics.one_minus(hp.b2)
    s = {
        "b1": hp.b1, "omb1": omb1, "b2": hp.b2, "omb2": omb2,
        "eps": hp.eps, "eps_root": hp.eps_root, "weight_decay": hp.weight_decay,
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


def _moments(g, mu, nu, nu_max, s, rule, rng):
    """This step's moments, stored, and the (m, v) the step uses (see ``_storage.as_stored``)."""
    real = s["b1"].dtype
    m = _storage.load(mu, g.dtype, g.shape)
    v = _storage.load(nu, real, g.shape)
    m = s["omb1"].astype(g.dtype) * g + s["b1"].astype(g.dtype) * m
    if rule.infinity_norm:
        v = jnp.maximum(jnp.abs(g) + s["eps"], s["b2"] * v)
    else:
        v = s["omb2"] * _numerics.abs_sq(g) + s["b2"] * v
    mu, nu = _storage.store(m, mu, rng), _storage.store(v, nu, rng)
    m, v = _storage.as_stored(m, mu), _storage.as_stored(v, nu)
    if nu_max is None:
        return (mu, nu, None), m, v
    previous = _storage.load(nu_max, real, g.shape)
    new_max = jnp.maximum(previous, v / s["bc2"] if rule.max_bias_corrected else v)
    nu_max = _storage.store(new_max, nu_max, rng)
    return (mu, nu, nu_max), m, _storage.as_stored(new_max, nu_max)


def _direction(g, m, v_used, p, decay, s, rule):
    """The step before the learning rate: bias-corrected m over the root of v, plus decay."""
    if rule.nesterov:
        m_hat = ((s["b1"] / s["bc1_next"]).astype(g.dtype) * m
                 + (s["omb1"] / s["bc1"]).astype(g.dtype) * g)
    else:
        m_hat = m / s["bc1"].astype(g.dtype)
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
    return direction


def _write(p, c, delta, dtype, rule, rng):
    """A 16-bit param's update under stochastic or Kahan rounding, and its new compensation.

    The new param is rounded here and the update returned (in ``dtype``, the gradient's) is its
    difference from the old one. That difference is exact whenever the old and new param are
    within a factor of 2 of each other (Sterbenz's lemma), so ``optax.apply_updates`` lands on
    exactly the rounded param; where it is not (a param crossing zero in one step), it lands
    within half an ulp of the update, and Kahan's compensation records the difference too.
    """
    p32 = p.astype(jnp.float32)
    if rule.kahan:
        exact = p32 + (delta + c.astype(jnp.float32))
        target = exact.astype(p.dtype)
    else:
        exact = p32 + delta
        seed, count, stream = rng
        bits = _numerics.random_bits(p.shape, seed=seed, count=count, stream=stream,
                                     sharding=jax.typeof(p).sharding)
        target = _numerics.stochastic_round(exact, p.dtype, bits)
    u = (target.astype(jnp.float32) - p32).astype(dtype)
    if not rule.kahan:
        return u, None
    landed = (p32 + u.astype(jnp.float32)).astype(p.dtype)  # what apply_updates computes
    return u, (exact - landed.astype(jnp.float32)).astype(c.dtype)


def decay_flags(fn, treedef, grads, params, weight_decay, mask):
    """Per-leaf booleans: which leaves get weight decay."""
    if concrete_float(fn, "weight_decay", weight_decay) == 0:
        return [False] * treedef.num_leaves
    if params is None:
        raise ValueError(f"{fn}: weight decay needs the params: call update(grads, state, params)")
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


def step(fn, grads, state, params, hp, rule, mask=None):
    """The single implementation behind :func:`update`, :func:`adamx.apply` and every factory.

    Args:
      fn: The public name used in error messages.
      grads, state, params, mask: See :func:`update`.
      hp: The :class:`Hyperparams`; a None learning rate returns the direction itself
        (``scale_by_adam``).
      rule: The :class:`Rule`.

    Returns:
      ``(updates, new_state)``.
    """
    g_leaves, treedef, fields = _state.check(fn, state, grads, amsgrad=rule.amsgrad,
                                             kahan=rule.kahan)
    n = len(g_leaves)
    hp = hp.at(fn, state.count)  # a schedule reads the count before this step, as in optax
    lr = hp.learning_rate
    decay = decay_flags(fn, treedef, grads, params, hp.weight_decay, mask)
    if rule.param_rounding != "nearest" and params is None:
        raise ValueError(f"{fn}: param_rounding={rule.param_rounding!r} needs the params: call "
                         "update(grads, state, params)")
    p_leaves = [None] * n if params is None else params_like(fn, treedef, grads, params)
    rounded = [p is not None and _storage.trained(p)
               and _numerics.rounds(jnp.result_type(p), rule.param_rounding) for p in p_leaves]

    count = _numerics.safe_increment(state.count)
    scalars = {}
    stored = [fields[name] or [None] * n for name in ("mu", "nu", "nu_max", "compensation")]
    outs = []
    for k, (g, p) in enumerate(zip(g_leaves, p_leaves)):
        if not _storage.trained(g):
            # An integer param is not trained: a zero update (in the gradient's dtype, an integer
            # or float0, as apply_if_finite's skipped step and optax's own updates have it).
            outs.append((np.zeros(np.shape(g), jnp.result_type(g)), None, None, None, None))
            continue
        g = jnp.asarray(g)
        dtype = _numerics.compute_dtype(g.dtype)
        if dtype not in scalars:
            scalars[dtype] = step_scalars(dtype, count, hp, rule)
        # stochastic rounding (of the param, of quantized moments) draws its bits from
        # (seed, count, leaf, element)
        rng = (hp.seed, count, k)
        outs.append(_leaf_step(g, [x[k] for x in stored], p, decay[k], lr, scalars[dtype], rule,
                               rng, rounded[k]))

    new_fields = {name: None if fields[name] is None else treedef.unflatten([o[i] for o in outs])
                  for i, name in enumerate(("mu", "nu", "nu_max", "compensation"), start=1)}
    return treedef.unflatten([o[0] for o in outs]), _state.AdamState(count=count, **new_fields)


def _leaf_step(g, stored, p, decay, lr, s, rule, rng, rounded):
    """One trained leaf: its update, and its (mu, nu, nu_max, compensation) as stored."""
    # moments kept in host memory (adamx.host_offload_shardings) are updated on the device
    mu, nu, nu_max, c = (to_device(x) for x in stored)
    real = s["b1"].dtype
    g_c = g.astype(_numerics.complex_dtype(real) if jnp.iscomplexobj(g) else real)
    if rule.maximize:
        g_c = -g_c
    moments, m, v_used = _moments(g_c, mu, nu, nu_max, s, rule, rng)
    u = _direction(g_c, m, v_used, p, decay, s, rule)
    if lr is not None:
        u = jnp.asarray(-lr, real).astype(g_c.dtype) * u
    if rounded:
        u, c = _write(p, c, u, g.dtype, rule, rng)
    else:
        u = u.astype(g.dtype)
    return (u,) + tuple(like(x, old) for x, old in zip(moments + (c,), stored))


def update(
    grads: PyTree,
    state: _state.AdamState,
    params: Optional[PyTree] = None,
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
) -> tuple[PyTree, _state.AdamState]:
    r"""One Adam step: returns the updates to add to the params, and the new state.

    For each leaf, with :math:`t` the step count after this step:

    .. math::

      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2 \\
      \hat m_t &= m_t / (1 - \beta_1^t), \quad \hat v_t = v_t / (1 - \beta_2^t) \\
      u_t &= -\eta \left(\hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
             + \lambda\, \theta_{t-1}\right)

    The math runs in float32 (float64 for float64 leaves); updates come back in the gradients'
    dtype. Every numeric hyperparameter may be a Python
    number or a JAX array, so a value passed as an argument of a jitted step changes without
    recompiling. Integer and boolean params are not trained: their updates are zeros.

    Concrete hyperparameters are checked here; traced ones cannot be without a host round trip,
    so a bad value passed into a jitted step (``b2=1.0``) gives NaN:
    :func:`adamx.check_hyperparams` checks them under ``jax.experimental.checkify``.

    Args:
      grads: Gradients, with the tree structure and shapes of the params.
      state: The :class:`adamx.AdamState` from :func:`adamx.init` or a previous step.
      params: The current params; needed for weight decay and for ``param_rounding``.
      learning_rate: :math:`\eta`: a number, an array, or a schedule (a callable of the step
        count before this step).
      b1: :math:`\beta_1`, the first moment's decay, in [0, 1).
      b2: :math:`\beta_2`, the second moment's decay, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment; >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root; >= 0.
      weight_decay: :math:`\lambda`, decoupled weight decay as in AdamW: >= 0, or a schedule.
      mask: Which leaves get weight decay: a pytree of bools (the params' structure or a
        prefix of it) or a callable of the params returning one. None decays all leaves.
      eps_hat: Use Kingma & Ba's :math:`\hat\epsilon` form (as Keras and TensorFlow do):
        :math:`u_t = -\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t) \cdot m_t / (\sqrt{v_t} + \epsilon)`.
      maximize: Ascend the objective (negates the gradients on entry, as PyTorch does).
      nesterov: NAdam, in optax's form.
      amsgrad: AMSGrad: the state must have ``nu_max`` (``init(..., amsgrad=True)``), and a state
        with ``nu_max`` is refused without it.
      max_bias_corrected: With ``amsgrad``, take the maximum of the bias-corrected second
        moment (optax) instead of the raw one (PyTorch and Keras).
      param_rounding: How a float16 or bfloat16 param takes its step: ``"nearest"`` (the add in
        its dtype; a step below half an ulp is lost), ``"stochastic"`` (rounded up or down at
        random with the probabilities that make it exact on average) or ``"kahan"`` (the
        rounding error is kept in ``state.compensation`` and added back next step). Other
        dtypes always take the nearest. The state must be built with the same choice.
      seed: The seed of stochastic rounding, an integer in [0, 2**32); the random bits are a
        function of the seed, the step count, the leaf and the element.

    Returns:
      ``(updates, new_state)``.

    Raises:
      ValueError: For a hyperparameter out of range, or a state that does not fit (the grads'
        structure or shapes, its algorithm, its count), naming the field and key path.
      TypeError: For a hyperparameter that is not a number, or a state that is not an
        :class:`adamx.AdamState`.

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
    rule = Rule(eps_hat=eps_hat, maximize=maximize, nesterov=nesterov, amsgrad=amsgrad,
                max_bias_corrected=max_bias_corrected, param_rounding=param_rounding)
    rule.check(fn)
    hp = Hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay, seed).check(fn)
    return step(fn, grads, state, params, hp, rule, mask)
