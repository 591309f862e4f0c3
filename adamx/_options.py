"""The options of the update rule, each defined once: the numeric :class:`Hyperparams` (which may be
traced, so a new value does not recompile) and the static :class:`Rule` (fixed at trace time).

:func:`adamx.update`, :func:`adamx.apply` and every factory take these names; :func:`parse` turns
keyword arguments into one of each, with the defaults and checks written here and nowhere else.
"""

import dataclasses
from typing import Any, NamedTuple

import numpy as np
from jax.experimental import checkify

from adamx import _checks

ROUNDINGS = ("nearest", "stochastic", "kahan")


class Hyperparams(NamedTuple):
    """The numeric hyperparameters: Python numbers or (possibly traced) arrays.

    ``learning_rate`` is None for the ``scale_by_*`` transformations, which return the direction
    itself. ``learning_rate`` and ``weight_decay`` may also be schedules (callables of the step
    count); ``weight_decay=None`` means no decay, and stays static under
    ``optax.inject_hyperparams``.
    """

    learning_rate: Any
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    eps_root: Any = 0.0
    weight_decay: Any = None
    seed: Any = 0

    def check(self, caller: str, *, scaled: bool = True) -> "Hyperparams":
        """Checks the concrete values (tracers pass: :func:`check_hyperparams` checks those).

        ``scaled=False`` (the ``scale_by_*`` transformations) takes no learning rate.
        """
        for name, value in self._asdict().items():
            if name == "weight_decay" and value is None:
                continue
            if name == "learning_rate" and not scaled:
                if value is not None:
                    raise TypeError(f"{caller}: takes no learning_rate, got {value!r}")
                continue
            if name in ("learning_rate", "weight_decay") and value is None:
                raise TypeError(f"{caller}: {name} must be a number, an array or a schedule, got None")
            if not (name in _SCHEDULES and callable(value)):
                check(caller, name, value)
        return self

    def at(self, caller: str, count: Any) -> "Hyperparams":
        """The values at the step whose count (before the step) is ``count``: the schedules
        called, as optax calls them, and what they return checked."""
        def value(name):
            schedule = getattr(self, name)
            if not callable(schedule):
                return schedule
            x = schedule(count)
            if x is None:
                raise TypeError(f"{caller}: the {name} schedule returned None; it must return a real "
                                "scalar")
            check(caller, name, x, what=f"{name} (the schedule's value)")
            return x

        return self._replace(learning_rate=value("learning_rate"), weight_decay=value("weight_decay"))


_SCHEDULES = ("learning_rate", "weight_decay")


def _decay(x):
    return (x >= 0) & (x < 1)


def _non_negative(x):
    return (x >= 0) & (x <= _checks.F32_MAX)


# Each hyperparameter's allowed values, once: a predicate (of a float64 NumPy value, or of a
# traced array under checkify) and how the messages say it.
_RANGES = {
    "learning_rate": (_non_negative, "be finite and >= 0"),
    "b1": (_decay, "be in [0, 1)"),
    "b2": (_decay, "be in [0, 1)"),
    "eps": (_non_negative, "be finite and >= 0"),
    "eps_root": (_non_negative, "be finite and >= 0"),
    "weight_decay": (_non_negative, "be finite and >= 0"),
    "seed": (lambda x: (x >= 0) & (x <= _seed_top(x)), "be in [0, 2**32)"),
}


def _seed_top(x):
    """2**32 - 1, in a traced integer seed's own dtype where that holds it (int64 under x64)."""
    if isinstance(x, np.floating):
        return np.float64(2**32 - 1)
    return np.asarray(min(np.iinfo(x.dtype).max, 2**32 - 1), x.dtype)


def check(caller: str, name: str, value: Any, *, what: str = "") -> None:
    """Checks one concrete hyperparameter against its range; a tracer's shape and dtype only.

    Raises:
      TypeError: If ``value`` is not a real scalar (an integer, for the seed).
      ValueError: If it is out of range, naming ``what`` (default: ``name``) and the value.
    """
    what = what or name
    x = _checks.concrete_integer(caller, what, value) if name == "seed" else (
        _checks.concrete_float(caller, what, value))
    if x is None:
        return  # traced
    predicate, allowed = _RANGES[name]
    if predicate(np.float64(x) if abs(x) < 2**1000 else np.float64(np.sign(x) * np.inf)):
        return
    if predicate is _non_negative and 0 <= x < np.inf:
        allowed = f"be finite in float32 (at most {_checks.F32_MAX:.4g})"
    hint = ""
    if predicate is _decay and x == 1 and str(getattr(value, "dtype", "")) in ("bfloat16", "float16"):
        hint = (f": a decay rate like 0.999 rounds to 1 in {value.dtype}; keep it in float32 "
                "(optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32))")
    raise ValueError(f"{caller}: {what} must {allowed}, got {value!r}{hint}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """The static choices of the update rule (which variant of Adam), fixed at trace time."""

    nesterov: bool = False
    amsgrad: bool = False
    adamax: bool = False
    eps_hat: bool = False
    maximize: bool = False
    max_bias_corrected: bool = False
    bias_correction_mu: bool = True
    bias_correction_nu: bool = True
    param_rounding: str = "nearest"

    def check(self, caller: str) -> "Rule":
        """Rejects values and combinations that have no defined meaning."""
        flags = dataclasses.asdict(self)
        _checks.check_choice(caller, "param_rounding", flags.pop("param_rounding"), ROUNDINGS)
        for name, value in flags.items():
            _checks.check_bool(caller, name, value)
        if self.max_bias_corrected and not self.amsgrad:
            raise ValueError(f"{caller}: max_bias_corrected=True is an AMSGrad option (amsgrad=True)")
        if self.amsgrad and self.adamax:
            raise ValueError(f"{caller}: amsgrad=True and adamax=True are two different algorithms")
        if self.eps_hat and (self.max_bias_corrected or self.adamax or not self.bias_correction_nu):
            raise ValueError(
                f"{caller}: eps_hat=True moves the second moment's bias correction onto the step, so "
                "it cannot be combined with max_bias_corrected=True, adamax=True or "
                "bias_correction_nu=False")
        return self

    @property
    def kahan(self) -> bool:
        return self.param_rounding == "kahan"


HYPERPARAMS = Hyperparams._fields
RULE = tuple(field.name for field in dataclasses.fields(Rule))
OPTIONS = HYPERPARAMS + RULE + ("mask",)


def parse(caller: str, options: dict, *, fixed: Any = (), scaled: bool = True
          ) -> tuple[Hyperparams, Rule, Any]:
    """``(Hyperparams, Rule, mask)`` from keyword arguments named as in :data:`OPTIONS`, checked.

    Args:
      caller: The public name, for messages.
      options: The keyword arguments; missing ones take their defaults, except
        ``learning_rate``, which is required when ``scaled``.
      fixed: Names the caller sets itself (a factory's algorithm), refused from ``options``.
      scaled: False for the ``scale_by_*`` transformations, which take no learning rate.

    Raises:
      TypeError: For an unknown or fixed option, or a missing ``learning_rate``.
      ValueError: For a value out of range, or a combination without meaning.
    """
    unknown = sorted((set(options) - set(OPTIONS)) | (set(options) & set(fixed)))
    if unknown:
        raise TypeError(f"{caller}: unexpected keyword argument{'s' * (len(unknown) > 1)} "
                        f"{', '.join(map(repr, unknown))}")
    if scaled and "learning_rate" not in options:
        raise TypeError(f"{caller}: missing the keyword argument 'learning_rate'")
    values = {k: v for k, v in options.items() if k in HYPERPARAMS}
    if values.get("seed", 0) is None:
        del values["seed"]  # the factories' default: 0, and not a number inject_hyperparams injects
    hyperparams = Hyperparams(**{"learning_rate": None, **values})
    rule = Rule(**{k: v for k, v in options.items() if k in RULE})
    return hyperparams.check(caller, scaled=scaled), rule.check(caller), options.get("mask")


def check_hyperparams(*, count: Any = None, **hyperparams: Any) -> None:
    """Checks hyperparameters that may be traced, for a step run under ``checkify.checkify``.

    adamx checks every concrete hyperparameter when a transformation is built or
    :func:`adamx.update` is called. A value passed into a jitted step is a tracer there and cannot
    be checked without a host round trip, so a bad one (``b2=1.0``) gives NaN params. Call this
    inside the step, wrapped in ``jax.experimental.checkify.checkify``, to get the same checks
    on traced values: the returned error names the argument and its value. Concrete values are
    checked at once (and raise); None skips an argument.

    Args:
      count: A state's step count (``state.count``): an integer in [0, 2**31).
      **hyperparams: Any of ``learning_rate``, ``b1``, ``b2``, ``eps``, ``eps_root``,
        ``weight_decay`` and ``seed``, as in :func:`adamx.update`.

    Raises:
      ValueError: For a concrete value out of range.
      TypeError: For an unknown argument, or a concrete value that is not a number (not an
        integer, for ``seed`` and ``count``).

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> from jax.experimental import checkify
      >>> def step(b2):
      ...     adamx.check_hyperparams(b2=b2)
      ...     return adamx.update(jnp.ones(2), adamx.init(jnp.ones(2)), learning_rate=0.1, b2=b2)[0]
      >>> error, _ = jax.jit(checkify.checkify(step))(1.0)
      >>> print(error.get())  # doctest: +ELLIPSIS
      adamx.check_hyperparams: b2 must be in [0, 1), got 1.0 (`check` failed)...
    """
    caller = "adamx.check_hyperparams"
    unknown = sorted(set(hyperparams) - set(HYPERPARAMS))
    if unknown:
        raise TypeError(f"{caller}: unexpected keyword argument {unknown[0]!r}; it checks "
                        f"{', '.join(HYPERPARAMS)} and count")
    for name, value in hyperparams.items():
        if value is None:
            continue
        if _checks.is_traced(value):
            predicate, allowed = _RANGES[name]
            checkify.check(predicate(value), f"{caller}: {name} must {allowed}, got {{}}", value)
        else:
            check(caller, name, value)
    if count is not None:
        concrete = _checks.concrete_integer(caller, "count", count)
        if concrete is None:
            checkify.check(count >= 0, f"{caller}: state.count must be >= 0, got {{}}", count)
        elif not 0 <= concrete <= _checks.INT32_MAX:
            raise ValueError(f"{caller}: count must be in [0, 2**31), got {count!r}")
