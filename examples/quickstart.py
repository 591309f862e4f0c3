"""Fit a small linear model with adamx inside a jitted, buffer-donating training step.

Run: python examples/quickstart.py
"""

import functools

import jax
import jax.numpy as jnp
import optax

import adamx


def main(steps=300, learning_rate=0.05):
    key_x, key_w, key_noise = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (256, 8))
    true_w = jax.random.normal(key_w, (8,))
    y = x @ true_w + 0.01 * jax.random.normal(key_noise, (256,))

    def loss_fn(params):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    tx = optax.chain(optax.clip_by_global_norm(10.0), adamx.adam(learning_rate))
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        params, state, loss = step(params, state)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.6f}")
    error = float(jnp.max(jnp.abs(params["w"] - true_w)))
    print(f"max |w - w_true| = {error:.4f}")
    return error


if __name__ == "__main__":
    main()
