"""Shared test utilities: seeded trees and gradient sequences, and a plain jitted driver."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def nested_params(dtype=jnp.float32, seed=0):
    """A tree with dicts, lists, tuples and a None, of a few leaf shapes."""
    rng = np.random.default_rng(seed)

    def leaf(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {"dense": {"w": leaf(4, 3), "b": leaf(3)}, "layers": [leaf(2, 2, 2), (leaf(5), None)],
            "scale": leaf()}


def grad_sequence(params, steps, seed=1, scale=1.0):
    """Seeded gradients with the params' structure: a fixed function of the step, not the params."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    return [
        treedef.unflatten([
            jnp.asarray(scale * rng.normal(size=np.shape(x)) * rng.choice([1e-3, 1.0, 30.0]),
                        jnp.result_type(x))
            for x in leaves
        ])
        for _ in range(steps)
    ]


def run(tx, params, grads_seq):
    """Applies ``tx`` over ``grads_seq`` in a jitted step; returns the params after each step."""
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    history = []
    for grads in grads_seq:
        params, state = step(params, state, grads)
        history.append(params)
    return history, state


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
