"""adamx: Adam for JAX as pure functions over an immutable state, and a drop-in Optax transformation.

Example:
  >>> import jax, jax.numpy as jnp, optax, adamx
  >>> params = {"w": jnp.array([1.0, 2.0])}
  >>> tx = adamx.adam(1e-2)
  >>> state = tx.init(params)
  >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  >>> updates, state = tx.update(grads, state)
  >>> optax.apply_updates(params, updates)["w"]
  Array([0.99, 1.99], dtype=float32)
"""

from adamx._formats import Int4Blocks, Int4Rank1, Int8Blocks
from adamx._fused import apply, kernel_available
from adamx._migrate import from_optax, to_optax
from adamx._options import check_hyperparams
from adamx._quantize import (
    Int4Spec,
    Int8Spec,
    dequantize,
    dequantize_state,
    int4_moments,
    int8_moments,
    quantize,
)
from adamx._sharding import host_offload_shardings, zero1_shardings
from adamx._state import AdamState, init
from adamx._transforms import (
    adam,
    adamax,
    adamaxw,
    adamw,
    amsgrad,
    nadam,
    nadamw,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
)
from adamx._update import update

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "Int4Blocks",
    "Int4Rank1",
    "Int4Spec",
    "Int8Blocks",
    "Int8Spec",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "amsgrad",
    "apply",
    "check_hyperparams",
    "dequantize",
    "dequantize_state",
    "from_optax",
    "host_offload_shardings",
    "init",
    "int4_moments",
    "int8_moments",
    "kernel_available",
    "nadam",
    "nadamw",
    "quantize",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "to_optax",
    "update",
    "zero1_shardings",
]
