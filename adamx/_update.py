"""Adam's update: the math of one leaf, lifted once to pytrees; and the public :func:`update`.

Plain JAX only: nothing here dispatches to native code, reads a file or a global switch, so
every step traces to the same computation on every backend and exports with ``jax.export``.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _numerics, _options, _state, _storage
from adamx._checks import concrete_float, keystr, params_like, short
from adamx._options import Hyperparams, Rule
from adamx._sharding import to_device, to_memory_of

PyTree = Any


class Scalars(NamedTuple):
    """One step's scalars in one compute dtype, computed once per step rather than per leaf."""

    b1: jax.Array
    one_minus_b1: jax.Array
    b2: jax.Array
    one_minus_b2: jax.Array
    eps: jax.Array
    eps_root: jax.Array
    weight_decay: jax.Array
    learning_rate: jax.Array  # 0 for the scale_by_* transformations, which do not scale
    bias_correction1: jax.Array  # 1 - b1**t (1 without bias correction of the first moment)
    bias_correction2: jax.Array  # 1 - b2**t (1 without bias correction of the second moment)
    next_bias_correction1: jax.Array  # 1 - b1**(t+1), for Nesterov's look-ahead


def moments(g, m, v, s: Scalars, rule: Rule):
    """This step's moments from the last ones (Kingma & Ba, Algorithm 1 and section 7.1)."""
    m = _as(s.one_minus_b1, g) * g + _as(s.b1, g) * m
    if rule.adamax:
        v = jnp.maximum(jnp.abs(g) + s.eps, s.b2 * v)  # the infinity norm, eps inside as optax
    else:
        v = s.one_minus_b2 * _numerics.abs_sq(g) + s.b2 * v
    return m, v


def direction(g, m, v, s: Scalars, rule: Rule):
    """The step before the learning rate: the bias-corrected ``m / (sqrt(v) + eps)``.

    ``v`` is the second moment the step uses: AMSGrad's maximum where the rule is AMSGrad (the
    maximum of the bias-corrected one with ``max_bias_corrected``, so it is not corrected again).
    """
    if rule.nesterov:
        m_hat = (_as(s.b1 / s.next_bias_correction1, m) * m
                 + _as(s.one_minus_b1 / s.bias_correction1, g) * g)
    else:
        m_hat = m / _as(s.bias_correction1, m)
    if rule.adamax:
        return m_hat / _as(v, m_hat)
    if rule.eps_hat:  # Kingma & Ba's eps-hat: the correction of v moves onto the step
        return m_hat * _as(jnp.sqrt(s.bias_correction2) / (jnp.sqrt(v + s.eps_root) + s.eps), m_hat)
    v_hat = v if rule.max_bias_corrected else v / s.bias_correction2
    return m_hat / _as(jnp.sqrt(v_hat + s.eps_root) + s.eps, m_hat)


def _as(x, like):
    """``x`` in ``like``'s dtype: a real scalar or array meeting a complex first moment."""
    return x.astype(like.dtype)


def scalars(dtype, t, hyperparams: Hyperparams, rule: Rule) -> Scalars:
    """The :class:`Scalars` of step ``t`` (the count after it) in ``dtype``."""
    b1, b2, eps, eps_root, weight_decay, learning_rate = (
        hyperparams.b1, hyperparams.b2, hyperparams.eps, hyperparams.eps_root,
        hyperparams.weight_decay, hyperparams.learning_rate)
    one_minus_b1, one_minus_b2 = _numerics.one_minus(b1), _numerics.one_minus(b2)

    def correction(one_minus_b, t, enabled=True):
        # in float32 or wider: 1 - 0.999**t in bfloat16 rounds to 0 or 1
        return _numerics.bias_correction(one_minus_b, t, dtype) if enabled else 1

    values = Scalars(
        b1=b1, one_minus_b1=one_minus_b1, b2=b2, one_minus_b2=one_minus_b2, eps=eps,
        eps_root=eps_root, weight_decay=0 if weight_decay is None else weight_decay,
        learning_rate=0 if learning_rate is None else learning_rate,
        bias_correction1=correction(one_minus_b1, t, rule.bias_correction_mu),
        bias_correction2=correction(one_minus_b2, t, rule.bias_correction_nu),
        next_bias_correction1=correction(one_minus_b1, _numerics.safe_increment(t),
                                         rule.nesterov and rule.bias_correction_mu),
    )
    return Scalars(*(jnp.asarray(x, dtype) for x in values))


# ---- one leaf ----------------------------------------------------------------------------------

class LeafState(NamedTuple):
    """One leaf's entries of the state, each as stored (see ``adamx/_storage.py``) or None."""

    mu: Any
    nu: Any
    nu_max: Any
    compensation: Any


class LeafStep(NamedTuple):
    """What one step does to one leaf: its update, and its new state entries."""

    update: Any
    state: LeafState


def _leaf_step(g, stored: LeafState, p, decay: bool, s: Scalars, rule: Rule, key: "LeafKey",
               scaled: bool) -> LeafStep:
    """One trained leaf: decode its moments, step, encode them back. Unless ``scaled`` (the
    learning rate applied), the update is the direction itself."""
    mu, nu, nu_max, c = (to_device(x) for x in stored)  # host-offloaded moments stream in
    real = s.b1.dtype
    g_c = g.astype(_numerics.complex_dtype(real) if jnp.iscomplexobj(g) else real)
    if rule.maximize:
        g_c = -g_c
    m, v = moments(g_c, _storage.load(mu, g_c.dtype), _storage.load(nu, real), s, rule)
    noise_m = noise_v = None
    if any(_storage.rounds_stochastically(x, second) for x, second in
           ((mu, False), (nu, True), (nu_max, True))):
        # one draw per element: a first moment rounds on its low 16 bits, a second on its high
        bits = _numerics.random_bits(g.shape, key.moments, jax.typeof(g).sharding)
        noise_m, noise_v = bits & np.uint32(0xFFFF), bits >> np.uint32(16)
    new = LeafState(_storage.store(m, mu, noise_m, second=False),
                    _storage.store(v, nu, noise_v, second=True), None, c)
    m, v = _storage.as_stored(m, new.mu), _storage.as_stored(v, new.nu, second=True)
    if nu_max is not None:
        v = jnp.maximum(_storage.load(nu_max, real),
                        v / s.bias_correction2 if rule.max_bias_corrected else v)
        new = new._replace(nu_max=_storage.store(v, nu_max, noise_v, second=True))
        v = _storage.as_stored(v, new.nu_max, second=True)
    u = direction(g_c, m, v, s, rule)
    if decay:
        u = u + _as(s.weight_decay, u) * p.astype(u.dtype)
    if scaled:
        u = _as(-s.learning_rate, u) * u
    if _numerics.rounds(p.dtype if p is not None else g.dtype, rule.param_rounding):
        u, c = _rounded(p, c, u, g.dtype, rule, key)
        new = new._replace(compensation=c)
    else:
        u = u.astype(g.dtype)
    return LeafStep(u, LeafState(*(to_memory_of(x, old) for x, old in zip(new, stored))))


def _rounded(p, c, delta, dtype, rule, key):
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
        bits = _numerics.random_bits(p.shape, key.param, jax.typeof(p).sharding)
        target = _numerics.stochastic_round(exact, bits, p.dtype)
    u = (target.astype(jnp.float32) - p32).astype(dtype)
    if not rule.kahan:
        return u, None
    landed = (p32 + u.astype(jnp.float32)).astype(p.dtype)  # what apply_updates computes
    return u, (exact - landed.astype(jnp.float32)).astype(c.dtype)


class LeafKey(NamedTuple):
    """The uint32 keys of one leaf's random bits at one step: its param's rounding, its moments'."""

    param: Any
    moments: Any


# ---- the tree ---------------------------------------------------------------------------------

class Prepared(NamedTuple):
    """A step's inputs checked and flattened: what :func:`step` and the fused kernel share."""

    treedef: Any
    paths: list
    grads: list
    params: list  # per leaf: the param, or None
    stored: list  # per leaf: a LeafState
    decay: list  # per leaf: whether it gets weight decay
    count: jax.Array  # the count after this step
    hyperparams: Hyperparams  # the schedules' values at this step


def prepare(caller: str, grads: PyTree, state: Any, params: Optional[PyTree], hyperparams: Hyperparams,
            rule: Rule, mask: Any = None, specs: Any = None) -> Prepared:
    """Checks a step's inputs (the state against the grads, the rule and ``specs``; the params'
    shapes) and flattens them; calls the schedules at the count before the step, as optax does."""
    paths, g_leaves, treedef, fields = _state.check(caller, state, grads, amsgrad=rule.amsgrad,
                                                    kahan=rule.kahan, specs=specs)
    n = len(g_leaves)
    p_leaves = [None] * n if params is None else params_like(caller, treedef, grads, params, paths)
    if rule.param_rounding != "nearest" and params is None:
        raise ValueError(f"{caller}: param_rounding={rule.param_rounding!r} needs the params: call "
                         "update(grads, state, params)")
    stored = [LeafState(*entries) for entries in zip(
        *(fields[name] or [None] * n for name in _state.LEAF_FIELDS))]
    if rule.kahan:
        _check_kahan(caller, paths, p_leaves, stored)
    hyperparams = hyperparams.at(caller, state.count)
    decay = decay_flags(caller, treedef, grads, params, hyperparams.weight_decay, mask)
    return Prepared(treedef, paths, g_leaves, p_leaves, stored, decay,
                    _numerics.safe_increment(state.count), hyperparams)


def _check_kahan(caller, paths, params, stored):
    """Each 16-bit param has its compensation, and only they: a state built before the params
    were cast (to or from bfloat16) does not fit them."""
    for path, p, leaf in zip(paths, params, stored):
        rounds = p is not None and _numerics.rounds(jnp.result_type(p), "kahan")
        c = leaf.compensation
        if rounds != (c is not None) or (rounds and c.dtype != jnp.result_type(p)):
            raise ValueError(
                f"{caller}: params{keystr(path)} is {short(p)}, but state.compensation{keystr(path)} "
                f"is {short(c)}: Kahan keeps a compensation in the dtype of each float16 and "
                "bfloat16 param, and only for them; build the state with init from the params "
                "as they are now")


def decay_flags(caller: str, treedef: Any, grads: PyTree, params: Optional[PyTree], weight_decay: Any,
                mask: Any) -> list:
    """Per-leaf booleans: which leaves get weight decay (None or a concrete 0: none)."""
    if weight_decay is None or concrete_float(caller, "weight_decay", weight_decay) == 0:
        return [False] * treedef.num_leaves
    if params is None:
        raise ValueError(f"{caller}: weight decay needs the params: call update(grads, state, params)")
    if mask is None:
        return [True] * treedef.num_leaves
    mask_tree = mask(params) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask_tree, grads)
    except ValueError as e:
        raise ValueError(f"{caller}: mask must have the params' tree structure (or a prefix): "
                         f"{e}") from None
    flags = treedef.flatten_up_to(full)
    for flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{caller}: mask leaves must be Python bools, got {flag!r}")
    return [bool(f) for f in flags]


def step(caller: str, grads: PyTree, state: Any, params: Optional[PyTree],
         hyperparams: Hyperparams, rule: Rule, mask: Any = None, specs: Any = None
         ) -> tuple[PyTree, Any]:
    """The one implementation behind :func:`update`, :func:`adamx.apply` and every factory.

    Args:
      caller: The public name, for messages.
      grads, state, params, mask: As in :func:`update`.
      hyperparams: The :class:`Hyperparams`; a None learning rate returns the direction itself.
      rule: The :class:`Rule`.
      specs: A factory's ``adamx._state.Specs``, which the state's moments must follow; None for
        the functional API, where the state says how its moments are stored.

    Returns:
      ``(updates, new_state)``.
    """
    prepared = prepare(caller, grads, state, params, hyperparams, rule, mask, specs)
    count, hyperparams = prepared.count, prepared.hyperparams
    keys = _numerics.leaf_keys(hyperparams.seed, count, prepared.paths)
    per_dtype = {}
    results = []
    for k, (g, p, stored, decay) in enumerate(zip(prepared.grads, prepared.params,
                                                  prepared.stored, prepared.decay)):
        if not _storage.has_moments(g):
            results.append(LeafStep(_zero_update(g, p), stored))
            continue
        g = jnp.asarray(g)
        dtype = _numerics.compute_dtype(g.dtype)
        if dtype not in per_dtype:
            per_dtype[dtype] = scalars(dtype, count, hyperparams, rule)
        key = LeafKey(keys[0, k], keys[1, k])
        results.append(_leaf_step(g, stored, p, decay, per_dtype[dtype], rule, key,
                                  scaled=hyperparams.learning_rate is not None))
    treedef = prepared.treedef
    new_fields = {name: None if getattr(state, name) is None else
                  treedef.unflatten([getattr(r.state, name) for r in results])
                  for name in _state.LEAF_FIELDS}
    return treedef.unflatten([r.update for r in results]), _state.AdamState(count, **new_fields)


def _zero_update(g, p):
    """An untrained (integer or boolean) leaf's update: zeros in the param's dtype, or without
    the params in the gradient's (int32 for a float0 gradient, which nothing can add)."""
    dtype = jnp.result_type(p) if p is not None else jnp.result_type(g)
    if dtype == jax.dtypes.float0:
        dtype = jnp.int32
    return np.zeros(np.shape(g), dtype)


def update(grads: PyTree, state: _state.AdamState, params: Optional[PyTree] = None, **options: Any
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
    dtype. Every numeric option may be a Python number or a JAX array, so a value passed as an
    argument of a jitted step changes without recompiling. Integer and boolean params are not
    trained: their updates are zeros.

    Concrete options are checked here; traced ones cannot be without a host round trip, so a bad
    value passed into a jitted step (``b2=1.0``) gives NaN: :func:`adamx.check_hyperparams`
    checks them under ``jax.experimental.checkify``.

    Args:
      grads: Gradients, with the tree structure and shapes of the params.
      state: The :class:`adamx.AdamState` from :func:`adamx.init` or a previous step.
      params: The current params; needed for weight decay and for ``param_rounding``.
      **options: Keyword arguments, ``learning_rate`` required:

        * ``learning_rate``: :math:`\eta`, a number, an array, or a schedule (a callable of the
          step count before this step).
        * ``b1``, ``b2``: :math:`\beta_1` (0.9), :math:`\beta_2` (0.999), the moments' decays,
          in [0, 1).
        * ``eps`` (1e-8): :math:`\epsilon`, added to the root of the second moment; >= 0.
        * ``eps_root`` (0): :math:`\epsilon_{root}`, added inside the root; >= 0.
        * ``weight_decay`` (None): :math:`\lambda`, decoupled weight decay as in AdamW: a
          number >= 0, an array or a schedule; None or 0 decays nothing.
        * ``mask`` (None): which leaves decay: a pytree of bools (the params' structure or a
          prefix of it) or a callable of the params returning one; None decays all.
        * ``nesterov`` (False): NAdam, in optax's form.
        * ``amsgrad`` (False): AMSGrad: the state must have ``nu_max``
          (``init(..., amsgrad=True)``), and a state with ``nu_max`` is refused without it.
        * ``max_bias_corrected`` (False): with ``amsgrad``, the maximum of the bias-corrected
          second moment (optax) instead of the raw one (PyTorch, Keras).
        * ``adamax`` (False): AdaMax, Adam under the infinity norm (Kingma & Ba, section 7.1):
          :math:`v_t = \max(\beta_2 v_{t-1}, |g_t| + \epsilon)`, :math:`u_t = -\eta \hat m_t/v_t`.
        * ``bias_correction_mu``, ``bias_correction_nu`` (True): correct each moment's bias.
        * ``eps_hat`` (False): Kingma & Ba's :math:`\hat\epsilon` form (Keras, TensorFlow):
          :math:`u_t = -\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t) \cdot m_t / (\sqrt{v_t} + \epsilon)`.
        * ``maximize`` (False): ascend the objective (the gradients are negated on entry).
        * ``param_rounding`` ("nearest"): how a float16 or bfloat16 param takes its step:
          ``"nearest"`` (the add in its dtype; a step below half an ulp is lost), ``"stochastic"``
          (up or down at random, exact on average) or ``"kahan"`` (the rounding error is kept in
          ``state.compensation`` and added back next step). The state must be built alike.
        * ``seed`` (0): the seed of stochastic rounding, an integer in [0, 2**32). The random
          bits are a function of the seed, the step count, the leaf's key path and the element.

    Returns:
      ``(updates, new_state)``.

    Raises:
      ValueError: For an option out of range, or a state that does not fit (the grads'
        structure or shapes, its algorithm, its count), naming the field and key path.
      TypeError: For an unknown option, one that is not a number, or a state that is not an
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
    caller = "adamx.update"
    hyperparams, rule, mask = _options.parse(caller, options)
    return step(caller, grads, state, params, hyperparams, rule, mask)
