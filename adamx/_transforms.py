"""Optax gradient transformations: thin factories over :func:`adamx.init` and the one update rule.

Each factory checks its concrete hyperparameters when it is called (tracers pass unchecked, so
``optax.inject_hyperparams`` works), and returns an ``optax.GradientTransformationExtraArgs``
whose ``init`` returns an :class:`adamx.AdamState` itself, so a schedule reads its ``count``.

References:
  Kingma & Ba, 2014, Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980
  Loshchilov & Hutter, 2019, Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
  Reddi et al., 2018, On the Convergence of Adam and Beyond, https://openreview.net/forum?id=ryQu7f-RZ
  Dozat, 2016, Incorporating Nesterov Momentum into Adam, https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ
"""

from typing import Any, Optional

import optax
from jax.typing import ArrayLike

from adamx import _state, _storage
from adamx._update import Hyperparams, Mask, Rule, step


def _transformation(fn, hp, rule, *, mask=None, mu_dtype=None, nu_dtype=None):
    """Validates once, then closes over the hyperparameters for init/update."""
    rule.check(fn)
    hp.check(fn, scaled=fn != "adamx.scale_by_adam")
    mu_spec = _storage.check_spec(fn, "mu_dtype", mu_dtype)
    nu_spec = _storage.check_spec(fn, "nu_dtype", nu_dtype)

    def init_fn(params):
        return _state.zeros(params, mu_spec=mu_spec, nu_spec=nu_spec, amsgrad=rule.amsgrad,
                            kahan=rule.kahan)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return step(fn, updates, state, params, hp, rule, mask)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    eps_hat: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam's bias-corrected moments: :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`.

    The learning rate is not applied (chain with ``optax.scale_by_learning_rate``, or use
    :func:`adam`). See :func:`adamx.update` for the equations and every argument.

    Args:
      b1: First moment decay, in [0, 1).
      b2: Second moment decay, in [0, 1).
      eps: Added to the root of the second moment; >= 0.
      eps_root: Added inside the root; >= 0.
      mu_dtype: Storage dtype of the first moment (None: the params' dtype).
      nu_dtype: Storage dtype of the second moment (None: the params' real dtype).
      nesterov: NAdam (optax's form).
      eps_hat: Kingma & Ba's epsilon-hat form (Keras, TensorFlow).
      maximize: Negate the gradients on entry.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> tx = optax.chain(adamx.scale_by_adam(), optax.scale_by_learning_rate(0.1))
      >>> params = jnp.array([1.0, 2.0])
      >>> updates, _ = tx.update(jnp.array([3.0, -4.0]), tx.init(params))
      >>> updates
      Array([-0.1,  0.1], dtype=float32)
    """
    return _transformation(
        "adamx.scale_by_adam", Hyperparams(None, b1, b2, eps, eps_root),
        Rule(eps_hat=eps_hat, maximize=maximize, nesterov=nesterov),
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    eps_hat: bool = False,
    maximize: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam (Kingma & Ba, 2014): :math:`u_t = -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)`.

    See :func:`adamx.update` for the equations. ``init`` returns an :class:`adamx.AdamState`.

    Args:
      learning_rate: A number, an array, or an optax schedule (called with the step count).
      b1: First moment decay, in [0, 1).
      b2: Second moment decay, in [0, 1).
      eps: Added to the root of the second moment; >= 0.
      eps_root: Added inside the root; >= 0.
      mu_dtype: Storage dtype of the first moment (None: the params' dtype).
      nu_dtype: Storage dtype of the second moment (None: the params' real dtype).
      nesterov: NAdam (optax's form); see :func:`nadam`.
      eps_hat: Kingma & Ba's epsilon-hat form. ``adam(1e-3, eps=1e-7, eps_hat=True)`` is
        ``keras.optimizers.Adam(learning_rate=1e-3)`` step for step.
      maximize: Ascend instead of descend, as ``torch.optim.Adam(maximize=True)``.
      param_rounding: How float16 and bfloat16 params take their step: ``"nearest"``,
        ``"stochastic"`` or ``"kahan"`` (see :func:`adamx.update`); updates then need the params.
      seed: The seed of stochastic rounding, an integer in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: For a concrete hyperparameter out of range, e.g.
        ``adamx.adam: b1 must be in [0, 1), got 1.5``.
      TypeError: For a hyperparameter that is not a number (or, for the rate, a schedule).

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
    return _transformation(
        "adamx.adam", Hyperparams(learning_rate, b1, b2, eps, eps_root, seed=seed),
        Rule(eps_hat=eps_hat, maximize=maximize, nesterov=nesterov,
             param_rounding=param_rounding),
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    eps_hat: bool = False,
    maximize: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    :math:`u_t = -\eta(\hat m_t/(\sqrt{\hat v_t}+\epsilon) + \lambda\theta)`.

    Matches ``optax.adamw`` (and ``torch.optim.AdamW``; with ``eps_hat=True``,
    ``keras.optimizers.AdamW``). The update needs the params: ``tx.update(grads, state, params)``.

    Args:
      learning_rate: A number, an array, or an optax schedule; it also scales the decay.
      b1: First moment decay, in [0, 1).
      b2: Second moment decay, in [0, 1).
      eps: Added to the root of the second moment; >= 0.
      eps_root: Added inside the root; >= 0.
      mu_dtype: Storage dtype of the first moment.
      weight_decay: :math:`\lambda` >= 0, or a schedule (a callable of the step count).
      mask: Which leaves decay: a pytree of bools (the params' structure or a prefix) or a
        callable of the params; None decays every leaf.
      nu_dtype: Storage dtype of the second moment.
      nesterov: NAdamW (optax's form); see :func:`nadamw`.
      eps_hat: Kingma & Ba's epsilon-hat form.
      maximize: Negate the gradients on entry (the decay still shrinks the params).
      param_rounding, seed: As in :func:`adam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number;
        ValueError from ``update`` when the params are not given.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> params = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
      >>> tx = adamx.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
      >>> grads = {"w": jnp.array([1.0]), "b": jnp.array([1.0])}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"], updates["b"]  # -lr * (1 + wd * w), and no decay on b
      (Array([-0.2], dtype=float32), Array([-0.1], dtype=float32))
    """
    return _transformation(
        "adamx.adamw", Hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay, seed),
        Rule(eps_hat=eps_hat, maximize=maximize, nesterov=nesterov,
             param_rounding=param_rounding),
        mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def nadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    eps_hat: bool = False,
    maximize: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdam (Dozat, 2016) in optax's form: :func:`adam` with ``nesterov=True``.

    The first moment is looked ahead one step:
    :math:`\hat m_t = \beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`.

    Args:
      learning_rate: A number, an array, or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, nu_dtype, eps_hat, maximize, param_rounding, seed: As in
        :func:`adam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> g, p = jnp.array([1.0, -3.0]), jnp.zeros(2)
      >>> updates, _ = adamx.nadam(0.1).update(g, adamx.nadam(0.1).init(p))
      >>> reference, _ = optax.nadam(0.1).update(g, optax.nadam(0.1).init(p))
      >>> [round(u, 4) for u in updates.tolist()], bool(jnp.allclose(updates, reference))
      ([-0.1474, 0.1474], True)
    """
    return _transformation(
        "adamx.nadam", Hyperparams(learning_rate, b1, b2, eps, eps_root, seed=seed),
        Rule(eps_hat=eps_hat, maximize=maximize, nesterov=True, param_rounding=param_rounding),
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def nadamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nu_dtype: Optional[Any] = None,
    eps_hat: bool = False,
    maximize: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    """NAdamW: :func:`adamw` with ``nesterov=True`` (optax's form).

    Args:
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nu_dtype, eps_hat,
      maximize, param_rounding, seed: As in :func:`adamw`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> g, p = jnp.array([1.0, -3.0]), jnp.array([0.5, 2.0])
      >>> tx, peer = adamx.nadamw(0.1, weight_decay=0.1), optax.nadamw(0.1, weight_decay=0.1)
      >>> updates, _ = tx.update(g, tx.init(p), p)
      >>> reference, _ = peer.update(g, peer.init(p), p)
      >>> bool(jnp.allclose(updates, reference))
      True
    """
    return _transformation(
        "adamx.nadamw", Hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay, seed),
        Rule(eps_hat=eps_hat, maximize=maximize, nesterov=True, param_rounding=param_rounding),
        mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    eps_hat: bool = False,
    maximize: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask = None,
    max_bias_corrected: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AMSGrad (Reddi et al., 2018): Adam whose second moment never decreases.

    The state keeps ``nu_max``. By default it is the maximum of the raw :math:`v_t`, bias-corrected
    afterwards, as ``torch.optim.Adam(amsgrad=True)`` and ``keras.optimizers.Adam(amsgrad=True)``
    do; ``max_bias_corrected=True`` takes the maximum of :math:`\hat v_t` instead, as
    ``optax.amsgrad`` does. The two differ while :math:`1 - \beta_2^t` is still growing.

    Args:
      learning_rate: A number, an array, or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, nu_dtype, eps_hat, maximize, param_rounding, seed: As in
        :func:`adam`.
      weight_decay: Decoupled weight decay (as :func:`adamw`); 0 disables it.
      mask: Which leaves decay, as in :func:`adamw`.
      max_bias_corrected: Take the maximum of the bias-corrected second moment (optax).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number, or
        ``eps_hat=True`` with ``max_bias_corrected=True``.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.amsgrad(0.1)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([4.0, 1.0]), state)
      >>> _, state = tx.update(jnp.array([0.0, 1.0]), state)
      >>> bool((state.nu_max >= state.nu).all())
      True
    """
    return _transformation(
        "adamx.amsgrad", Hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay, seed),
        Rule(eps_hat=eps_hat, maximize=maximize, amsgrad=True,
             max_bias_corrected=max_bias_corrected, param_rounding=param_rounding),
        mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )


def adamax(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    maximize: bool = False,
    param_rounding: str = "nearest",
    seed: ArrayLike = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaMax (Kingma & Ba, 2014, section 7.1): Adam under the infinity norm.

    .. math::

      u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
      \Delta\theta = -\eta\, m_t / ((1 - \beta_1^t)\, u_t)

    with :math:`\epsilon` inside the maximum, as ``optax.adamax`` and ``torch.optim.Adamax``
    put it. The state's ``nu`` holds :math:`u_t`.

    Args:
      learning_rate: A number, an array, or an optax schedule.
      b1: First moment decay, in [0, 1).
      b2: Decay of the infinity norm, in [0, 1).
      eps: Floor on the norm; >= 0.
      maximize: Negate the gradients on entry.
      param_rounding, seed: As in :func:`adam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError, TypeError: For a concrete hyperparameter out of range or not a number.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.adamax(0.1)
      >>> updates, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> updates, state.nu
      (Array([-0.1,  0.1], dtype=float32), Array([2. , 0.5], dtype=float32))
    """
    return _transformation(
        "adamx.adamax", Hyperparams(learning_rate, b1, b2, eps, seed=seed),
        Rule(maximize=maximize, infinity_norm=True, param_rounding=param_rounding),
    )
