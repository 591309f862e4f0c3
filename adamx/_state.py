"""The optimizer state, an immutable pytree, and :func:`init`."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adamx import _storage
from adamx._checks import check_bool

PyTree = Any


class AdamState(NamedTuple):
    """Adam's state: the step count and the moments, each mirroring the params' tree.

    Attributes:
      count: Steps taken so far, an int32 scalar that saturates at the int32 maximum.
      mu: The first moment (the exponential moving average of the gradients).
      nu: The second moment (the moving average of ``|g|**2``), or the infinity-norm moment
        for :func:`adamx.adamax`. Always real.
      nu_max: The running maximum of ``nu`` for AMSGrad, else None.

    A NamedTuple, as optax's own states are: it is a pytree, so it passes through ``jax.jit``,
    ``lax.scan``, ``lax.cond`` and ``jax.tree`` utilities; ``flax.serialization`` and orbax
    save it as a mapping of its field names; assigning to a field raises. :meth:`replace`
    makes a changed copy.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.ones(3)})
      >>> state.count, state.mu["w"].shape
      (Array(0, dtype=int32), (3,))
      >>> state.replace(count=jnp.int32(5)).count
      Array(5, dtype=int32)
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree = None

    def replace(self, **changes) -> "AdamState":
        """Returns a copy with the given fields replaced."""
        return self._replace(**changes)


def _check_inexact(params):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"adamx.init: params{jax.tree_util.keystr(path)} has dtype {dtype}; Adam needs "
                "float or complex leaves (mask integer leaves out with optax.masked)"
            )


def init(params, *, mu_dtype=None, nu_dtype=None, amsgrad=False) -> AdamState:
    """Builds a zero Adam state for ``params``.

    The moments are built with ``zeros_like``, so under ``jax.jit`` they follow the params'
    shardings, and ``jax.eval_shape(adamx.init, params)`` plans a state without allocating it.

    Args:
      params: A pytree of float or complex arrays (or ``jax.ShapeDtypeStruct``); None and
        ``optax.MaskedNode`` leaves pass through.
      mu_dtype: Storage dtype of the first moment; None keeps each param's dtype.
      nu_dtype: Storage dtype of the second moment; None keeps each param's real dtype, but
        float32 for float16 and bfloat16 params (a 16-bit second moment underflows or stalls).
      amsgrad: Also keep ``nu_max``, the running maximum of the second moment.

    Returns:
      An :class:`AdamState` with ``count = 0``.

    Raises:
      TypeError: If a leaf is an integer or boolean array (the message names its key path).
      ValueError: If ``mu_dtype`` or ``nu_dtype`` is not an accepted storage dtype.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> state = adamx.init({"w": jnp.zeros((2, 3), jnp.bfloat16)}, nu_dtype=jnp.float32)
      >>> state.mu["w"].dtype, state.nu["w"].dtype
      (dtype(bfloat16), dtype('float32'))
    """
    mu_spec = _storage.check_spec("adamx.init", "mu_dtype", mu_dtype)
    nu_spec = _storage.check_spec("adamx.init", "nu_dtype", nu_dtype)
    check_bool("adamx.init", amsgrad=amsgrad)
    _check_inexact(params)

    def moments(spec, *, real):
        return jax.tree.map(lambda p: _storage.zeros(p, spec, real=real), params)

    return AdamState(
        count=jnp.zeros([], jnp.int32),
        mu=moments(mu_spec, real=False),
        nu=moments(nu_spec, real=True),
        nu_max=moments(nu_spec, real=True) if amsgrad else None,
    )
