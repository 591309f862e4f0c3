"""Optax gradient transformations: thin factories over :func:`adamx.init` and the one update rule.

Each factory has optax's signature (the same names, positions and defaults), plus keyword-only
options of adamx's own, all named and checked as in :func:`adamx.update`. It checks its concrete
hyperparameters when it is called (tracers pass unchecked, so ``optax.inject_hyperparams``
works), and returns an ``optax.GradientTransformationExtraArgs`` whose ``init`` returns an
:class:`adamx.AdamState` itself, so a schedule reads its ``count``. Its ``update`` refuses a
state whose moments are not stored as ``mu_dtype``/``nu_dtype`` say.

References:
  Kingma & Ba, 2014, Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980
  Loshchilov & Hutter, 2019, Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
  Reddi et al., 2018, On the Convergence of Adam and Beyond, https://openreview.net/forum?id=ryQu7f-RZ
  Dozat, 2016, Incorporating Nesterov Momentum into Adam, https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ
"""

import functools
from typing import Any, Optional

import optax
from jax.typing import ArrayLike

from adamx import _options, _state, _storage
from adamx._update import step

Transformation = optax.GradientTransformationExtraArgs


def _transformation(caller: str, args: dict, *, scaled: bool = True, **rule: bool) -> Transformation:
    """The transformation of a factory called with ``args`` (its arguments, by name), running
    the algorithm that ``rule`` fixes (e.g. ``amsgrad=True``)."""
    args = dict(args)
    specs = _state.Specs(_storage.check_spec(caller, "mu_dtype", args.pop("mu_dtype", None)),
                         _storage.check_spec(caller, "nu_dtype", args.pop("nu_dtype", None)))
    hyperparams, rule, mask = _options.parse(caller, {**args, **rule}, scaled=scaled)

    def init_fn(params):
        return _state.zeros(caller, params, specs, amsgrad=rule.amsgrad, kahan=rule.kahan)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return step(caller, updates, state, params, hyperparams, rule, mask, specs)

    return Transformation(init_fn, update_fn)


def scale_by_adam(
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None, *, nesterov: bool = False, nu_dtype: Optional[Any] = None,
    eps_hat: bool = False, maximize: bool = False,
) -> Transformation:
    r"""Rescales updates by Adam's bias-corrected moments: :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`.

    The learning rate is not applied: chain with ``optax.scale_by_learning_rate``, or use
    :func:`adam`. Every argument is as in :func:`adamx.update` (``mu_dtype`` and ``nu_dtype`` as in
    :func:`adamx.init`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or of the wrong type.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> tx = optax.chain(adamx.scale_by_adam(), optax.scale_by_learning_rate(0.1))
      >>> updates, _ = tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))
      >>> updates
      Array([-0.1,  0.1], dtype=float32)
    """
    return _transformation("adamx.scale_by_adam", locals(), scaled=False)


def scale_by_amsgrad(
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None, bias_correction_mu: bool = True,
    bias_correction_nu: bool = True, *, nu_dtype: Optional[Any] = None, eps_hat: bool = False,
    maximize: bool = False, max_bias_corrected: bool = False,
) -> Transformation:
    """:func:`scale_by_adam` under AMSGrad: the second moment the step uses never decreases.

    See :func:`amsgrad`; every argument is as in :func:`adamx.update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or of the wrong type.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> tx = adamx.scale_by_amsgrad(max_bias_corrected=True)
      >>> g, state = jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(g, state)
      >>> peer = optax.scale_by_amsgrad()
      >>> bool(jnp.allclose(updates, peer.update(g, peer.init(jnp.zeros(2)))[0]))
      True
    """
    return _transformation("adamx.scale_by_amsgrad", locals(), scaled=False, amsgrad=True)


def scale_by_adamax(
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8, *,
    mu_dtype: Optional[Any] = None, nu_dtype: Optional[Any] = None, maximize: bool = False,
) -> Transformation:
    """:func:`scale_by_adam` under the infinity norm (AdaMax); see :func:`adamax`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or of the wrong type.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.scale_by_adamax()
      >>> updates, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> updates, state.nu
      (Array([ 1., -1.], dtype=float32), Array([2. , 0.5], dtype=float32))
    """
    return _transformation("adamx.scale_by_adamax", locals(), scaled=False, adamax=True)


def adam(
    learning_rate: optax.ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0, mu_dtype: Optional[Any] = None, *,
    nesterov: bool = False, nu_dtype: Optional[Any] = None, eps_hat: bool = False,
    maximize: bool = False, param_rounding: str = "nearest", seed: Optional[ArrayLike] = None,
) -> Transformation:
    r"""Adam (Kingma & Ba, 2014): :math:`u_t = -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)`.

    ``optax.adam``'s arguments, and adamx's own keyword-only ones, each as in
    :func:`adamx.update`: ``nu_dtype`` (and ``mu_dtype``: a dtype, ``"int8"`` or ``"int4"``, see
    :func:`adamx.init`), ``eps_hat`` (``adam(1e-3, eps=1e-7, eps_hat=True)`` is
    ``keras.optimizers.Adam(1e-3)`` step for step), ``maximize`` (as ``torch.optim.Adam``),
    ``param_rounding`` and ``seed`` for float16 and bfloat16 params.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: For a concrete argument out of range, e.g.
        ``adamx.adam: b1 must be in [0, 1), got 1.5``.
      TypeError: For an argument that is not a number (or, for the rate, a schedule).

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> params = {"w": jnp.array([1.0, -1.0])}
      >>> tx = adamx.adam(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> for _ in range(3):
      ...     updates, state = tx.update(jax.grad(loss)(params), state)
      ...     params = optax.apply_updates(params, updates)
      >>> [round(w, 4) for w in params["w"].tolist()], int(state.count)
      ([0.7016, -0.7016], 3)
    """
    return _transformation("adamx.adam", locals())


def adamw(
    learning_rate: optax.ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0, mu_dtype: Optional[Any] = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4, mask: Any = None, *, nesterov: bool = False,
    nu_dtype: Optional[Any] = None, eps_hat: bool = False, maximize: bool = False,
    param_rounding: str = "nearest", seed: Optional[ArrayLike] = None,
) -> Transformation:
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    :math:`u_t = -\eta(\hat m_t/(\sqrt{\hat v_t}+\epsilon) + \lambda\theta)`, as ``optax.adamw``
    and ``torch.optim.AdamW`` (with ``eps_hat=True``, ``keras.optimizers.AdamW``). The update
    needs the params: ``tx.update(grads, state, params)``. Arguments as in :func:`adam` and
    :func:`adamx.update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or not a number; ValueError
        from ``update`` when the params are not given.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> params = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
      >>> tx = adamx.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
      >>> grads = {"w": jnp.array([1.0]), "b": jnp.array([1.0])}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"], updates["b"]  # -lr * (1 + wd * w), and no decay on b
      (Array([-0.2], dtype=float32), Array([-0.1], dtype=float32))
    """
    return _transformation("adamx.adamw", locals())


def amsgrad(
    learning_rate: optax.ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0, mu_dtype: Optional[Any] = None,
    bias_correction_mu: bool = True, bias_correction_nu: bool = True, *,
    nu_dtype: Optional[Any] = None, eps_hat: bool = False, maximize: bool = False,
    weight_decay: Optional[optax.ScalarOrSchedule] = None, mask: Any = None,
    max_bias_corrected: bool = False, param_rounding: str = "nearest", seed: Optional[ArrayLike] = None,
) -> Transformation:
    r"""AMSGrad (Reddi et al., 2018): Adam whose second moment never decreases.

    The state keeps ``nu_max``. By default it is the maximum of the raw :math:`v_t`, bias-corrected
    afterwards, as ``torch.optim.Adam(amsgrad=True)`` and ``keras.optimizers.Adam(amsgrad=True)``
    do; ``max_bias_corrected=True`` takes the maximum of :math:`\hat v_t` instead, as
    ``optax.amsgrad`` does. The two differ while :math:`1 - \beta_2^t` is still growing.
    ``weight_decay`` (None: none) decays decoupled, as :func:`adamw`. Arguments as in
    :func:`adamx.update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or not a number, or
        ``eps_hat=True`` with ``max_bias_corrected=True``.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.amsgrad(0.1)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([4.0, 1.0]), state)
      >>> _, state = tx.update(jnp.array([0.0, 1.0]), state)
      >>> [round(x, 6) for x in state.nu.tolist()]
      [0.015984, 0.001999]
      >>> [round(x, 6) for x in state.nu_max.tolist()]  # keeps step one's 16 * (1 - b2)
      [0.016, 0.001999]
    """
    return _transformation("adamx.amsgrad", locals(), amsgrad=True)


def adamax(
    learning_rate: optax.ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, *, mu_dtype: Optional[Any] = None, nu_dtype: Optional[Any] = None,
    maximize: bool = False, param_rounding: str = "nearest", seed: Optional[ArrayLike] = None,
) -> Transformation:
    r"""AdaMax (Kingma & Ba, 2014, section 7.1): Adam under the infinity norm.

    .. math::

      u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
      \Delta\theta = -\eta\, m_t / ((1 - \beta_1^t)\, u_t)

    with :math:`\epsilon` inside the maximum, as ``optax.adamax`` and ``torch.optim.Adamax`` put
    it. The state's ``nu`` holds :math:`u_t`. Arguments as in :func:`adamx.update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.adamax(0.1)
      >>> updates, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> updates, state.nu
      (Array([-0.1,  0.1], dtype=float32), Array([2. , 0.5], dtype=float32))
    """
    return _transformation("adamx.adamax", locals(), adamax=True)


def adamaxw(
    learning_rate: optax.ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, weight_decay: optax.ScalarOrSchedule = 1e-4, mask: Any = None, *,
    mu_dtype: Optional[Any] = None, nu_dtype: Optional[Any] = None, maximize: bool = False,
    param_rounding: str = "nearest", seed: Optional[ArrayLike] = None,
) -> Transformation:
    r""":func:`adamax` with decoupled weight decay, as ``optax.adamaxw``:
    :math:`\Delta\theta = -\eta(m_t / ((1 - \beta_1^t) u_t) + \lambda\theta)`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete argument out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.adamaxw(0.1, weight_decay=0.5)
      >>> params = jnp.array([2.0, -0.5])
      >>> updates, _ = tx.update(jnp.array([1.0, 1.0]), tx.init(params), params)
      >>> updates  # -lr * (sign(g) + wd * param)
      Array([-0.2  , -0.075], dtype=float32)
    """
    return _transformation("adamx.adamaxw", locals(), adamax=True)


nadam = functools.partial(adam, nesterov=True)
nadam.__doc__ = r"""NAdam (Dozat, 2016) in optax's form: :func:`adam` with ``nesterov=True``.

The first moment is looked ahead one step:
:math:`\hat m_t = \beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`.

Example:
  >>> import jax.numpy as jnp, optax, adamx
  >>> g, p = jnp.array([1.0, -3.0]), jnp.zeros(2)
  >>> updates, _ = adamx.nadam(0.1).update(g, adamx.nadam(0.1).init(p))
  >>> reference, _ = optax.nadam(0.1).update(g, optax.nadam(0.1).init(p))
  >>> [round(u, 4) for u in updates.tolist()], bool(jnp.allclose(updates, reference))
  ([-0.1474, 0.1474], True)
"""

nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = r"""NAdamW: :func:`adamw` with ``nesterov=True``, in optax's form.

Example:
  >>> import jax.numpy as jnp, optax, adamx
  >>> g, p = jnp.array([1.0, -3.0]), jnp.array([0.5, 2.0])
  >>> tx, peer = adamx.nadamw(0.1, weight_decay=0.1), optax.nadamw(0.1, weight_decay=0.1)
  >>> updates, _ = tx.update(g, tx.init(p), p)
  >>> bool(jnp.allclose(updates, peer.update(g, peer.init(p), p)[0]))
  True
"""

# doctest collects functions' docstrings; the partials' are collected from here
__test__ = {"nadam": nadam.__doc__, "nadamw": nadamw.__doc__}
