"""Every factory's train step exports with ``jax.export`` from this CPU host for CPU, CUDA and
TPU, round-trips through serialization, and runs equal to the jitted step, bit for bit.

The oracle is the same step under ``jax.jit`` (itself proven against the float64 reference and
the peers elsewhere): an exported step must be the same computation, with no custom call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import adamx
from tests.helpers import grad_sequence, nested_params

# adamx registers AdamState for export serialization; optax's states need the same from their
# user (optax does not register them), here the EmptyState that optax.scale keeps.
export.register_namedtuple_serialization(optax.EmptyState, serialized_name="optax.EmptyState")

FACTORIES = {
    "adam": lambda: adamx.adam(1e-2),
    "adamw_masked": lambda: adamx.adamw(1e-2, weight_decay=0.1,
                                        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "nadam": lambda: adamx.nadam(1e-2),
    "nadamw": lambda: adamx.nadamw(1e-2),
    "amsgrad": lambda: adamx.amsgrad(1e-2),
    "adamax": lambda: adamx.adamax(1e-2),
    "scale_by_adam": lambda: optax.chain(adamx.scale_by_adam(), optax.scale(-1e-2)),
    "schedule_eps_hat": lambda: adamx.adam(optax.linear_schedule(1e-2, 1e-3, 5), eps_hat=True),
    "bf16_moments": lambda: adamx.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "stochastic": lambda: adamx.adam(1e-2, param_rounding="stochastic"),
    "kahan": lambda: adamx.adamw(1e-2, param_rounding="kahan"),
}


def params_for(name):
    params = nested_params()
    if name in ("stochastic", "kahan"):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return params


def train_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", list(FACTORIES))
def test_train_step_exports_for_every_platform_and_runs_like_jit(name):
    tx = FACTORIES[name]()
    params = params_for(name)
    state = tx.init(params)
    grads = grad_sequence(params, 3)
    step = jax.jit(train_step(tx))
    exported = export.export(step, platforms=("cpu", "cuda", "tpu"))(params, state, grads[0])
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert "custom_call" not in exported.mlir_module()
    restored = export.deserialize(exported.serialize())
    want_p, want_s, got_p, got_s = params, state, params, state
    for g in grads:
        want_p, want_s = step(want_p, want_s, g)
        got_p, got_s = restored.call(got_p, got_s, g)
    assert jax.tree.structure((got_p, got_s)) == jax.tree.structure((want_p, want_s))
    for got, want in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pure_update_with_traced_hyperparameters_exports():
    params = nested_params()
    state = adamx.init(params, amsgrad=True)

    def step(params, state, grads, lr, b2):
        updates, state = adamx.update(grads, state, params, learning_rate=lr, b2=b2,
                                      amsgrad=True, weight_decay=0.01)
        return optax.apply_updates(params, updates), state

    grads = grad_sequence(params, 1)[0]
    exported = export.export(jax.jit(step), platforms=("cpu", "cuda", "tpu"))(
        params, state, grads, 1e-2, 0.99)
    restored = export.deserialize(exported.serialize())
    for lr in (1e-2, 1e-3):  # one export, any learning rate
        got = restored.call(params, state, grads, lr, 0.99)
        want = jax.jit(step)(params, state, grads, lr, 0.99)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
