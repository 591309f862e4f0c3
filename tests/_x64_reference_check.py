"""Run in a process with JAX_ENABLE_X64=1: adamx in float64 against the float64 oracle to 1e-10."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx
from tests.helpers import grad_sequence, leaves64, nested_params
from tests.reference import run_reference

assert jax.config.jax_enable_x64
CASES = [
    dict(),
    dict(weight_decay=0.05),
    dict(eps_hat=True),
    dict(nesterov=True),
    dict(maximize=True),
]
for options in CASES:
    params = nested_params(jnp.float64, seed=3)
    grads = grad_sequence(params, 60, seed=4)
    state = adamx.init(params)
    step = jax.jit(lambda p, s, g, o=options: adamx.update(g, s, p, learning_rate=1e-2, b2=0.99, **o))
    history = []
    for g in grads:
        updates, state = step(params, state, g)
        params = optax.apply_updates(params, updates)
        history.append(leaves64(params))
    want = run_reference([leaves64(g) for g in grads], leaves64(nested_params(jnp.float64, seed=3)),
                         lr=1e-2, b2=0.99, **options)
    for got_step, want_step in zip(history, want):
        for g, w in zip(got_step, want_step):
            assert g.dtype == np.float64
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=str(options))

# A traced int64 seed of 2**32 or more would be taken mod 2**32: check_hyperparams flags it.
from jax.experimental import checkify  # noqa: E402

checked = jax.jit(checkify.checkify(lambda seed: adamx.check_hyperparams(seed=seed)))
assert "seed must be in [0, 2**32), got 4294967296" in checked(jnp.int64(2**32))[0].get()
assert checked(jnp.int64(2**32 - 1))[0].get() is None
print(f"checked {len(CASES)} option sets")
