"""Shared test utilities: seeded trees and gradient sequences, and the one harness that runs
steps of an optimizer over a gradient sequence (jitted, or under ``lax.scan``)."""

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


def optax_step(tx, record="params"):
    """A step ``(params, state, grads) -> (params, state, recorded)`` of an optax transformation:
    ``tx.update`` then ``optax.apply_updates``, recording the new params or the updates."""
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        return new, state, new if record == "params" else updates

    return step


def apply_step(**options):
    """The same for ``adamx.apply(grads, state, params, **options)``, recording the new params."""
    import adamx

    def step(params, state, grads):
        params, state = adamx.apply(grads, state, params, **options)
        return params, state, params

    return step


def run(step, params, state, grads_seq, *, scan=False):
    """Runs ``step`` over ``grads_seq`` from ``(params, state)``: jitted once and called per step,
    or (``scan=True``) inside one jitted ``lax.scan``. Returns ``(recorded per step, params,
    state)``, the records as a list of trees."""
    if scan:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads_seq)

        def body(carry, grads):
            params, state, recorded = step(*carry, grads)
            return (params, state), recorded

        (params, state), records = jax.jit(
            lambda c, xs: jax.lax.scan(body, c, xs))((params, state), stacked)
        return [jax.tree.map(lambda x, i=i: x[i], records) for i in range(len(grads_seq))], params, state
    jitted = jax.jit(step)
    history = []
    for grads in grads_seq:
        params, state, recorded = jitted(params, state, grads)
        history.append(recorded)
    return history, params, state


def assert_trees_equal(a, b):
    """Same structure, and every leaf equal bit for bit (dtypes included)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                            jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y)


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
