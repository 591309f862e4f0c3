"""AdamState as an immutable pytree, and update as a pure function under jit, scan and cond."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.helpers import grad_sequence, nested_params, optax_step, orbax_roundtrip, run


def test_assigning_a_state_field_raises():
    state = adamx.init(nested_params())
    with pytest.raises(AttributeError):
        state.count = jnp.int32(3)


def test_state_round_trips_through_tree_utilities():
    state = adamx.adam(1e-2).init(nested_params())
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, adamx.AdamState)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
    doubled = jax.tree.map(lambda x: x * 2, state)
    assert isinstance(doubled, adamx.AdamState)


def test_state_round_trips_through_flax_serialization():
    from flax import serialization
    params = nested_params()
    tx = adamx.amsgrad(1e-2)
    _, _, state = run(optax_step(tx), params, tx.init(params), grad_sequence(params, 3))
    restored = serialization.from_bytes(adamx.amsgrad(1e-2).init(params),
                                        serialization.to_bytes(state))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_jit_and_eager_steps_are_equal():
    params = nested_params()
    grads = grad_sequence(params, 5)
    tx = adamx.adamw(1e-2, weight_decay=0.1)
    state_e = state_j = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        u_e, state_e = tx.update(g, state_e, params)
        u_j, state_j = step(g, state_j, params)
        for a, b in zip(jax.tree.leaves((u_e, state_e)), jax.tree.leaves((u_j, state_j))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_learning_rate_as_argument_traces_once_for_three_values():
    traces = []

    @jax.jit
    def step(params, state, grads, lr):
        traces.append(None)
        updates, state = adamx.update(grads, state, learning_rate=lr)
        return optax.apply_updates(params, updates), state

    params = jnp.ones(3)
    state = adamx.init(params)
    g = jnp.array([1.0, -2.0, 3.0])
    for lr in (0.1, 0.01, 0.001):
        new_params, _ = step(params, state, g, lr)
        # First step closed form: -lr * sign(g) (eps negligible).
        np.testing.assert_allclose(new_params, 1 - lr * np.sign(g), rtol=1e-6)
    assert len(traces) == 1


def test_state_carries_through_scan_and_cond():
    params = nested_params()
    grads = grad_sequence(params, 8)
    tx = adamx.adam(1e-2)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)

    def body(carry, g):
        params, state = carry
        updates, new_state = tx.update(g, state)
        # Skip odd steps through lax.cond: both branches must carry the same state type.
        skip = state.count % 2 == 1
        state = jax.lax.cond(skip, lambda: state.replace(count=new_state.count), lambda: new_state)
        updates = jax.lax.cond(skip, lambda: jax.tree.map(jnp.zeros_like, updates),
                               lambda: updates)
        return (optax.apply_updates(params, updates), state), None

    (p_scan, s_scan), _ = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))(
        (params, tx.init(params)), stacked)
    assert isinstance(s_scan, adamx.AdamState) and int(s_scan.count) == 8

    # The same sequence unrolled by hand in Python.
    p, s = params, tx.init(params)
    for g in grads:
        updates, new_s = tx.update(g, s)
        if int(s.count) % 2 == 1:
            s = s.replace(count=new_s.count)
        else:
            s = new_s
            p = optax.apply_updates(p, updates)
    for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eval_shape_plans_a_state_without_allocating():
    params = nested_params()
    abstract = jax.eval_shape(lambda p: adamx.init(p, nu_dtype=jnp.bfloat16), params)
    assert isinstance(abstract, adamx.AdamState)
    assert abstract.nu["dense"]["w"] == jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)
    assert abstract.count == jax.ShapeDtypeStruct((), jnp.int32)


def test_amsgrad_state_keeps_a_running_maximum():
    params = jnp.zeros(3)
    tx = adamx.amsgrad(1e-2)
    state = tx.init(params)
    previous = np.zeros(3)
    for g in grad_sequence(params, 10):
        _, state = tx.update(g, state)
        assert (np.asarray(state.nu_max) >= previous).all()
        assert (np.asarray(state.nu_max) >= np.asarray(state.nu)).all()
        previous = np.asarray(state.nu_max)


def test_state_round_trips_exactly_through_orbax(tmp_path):
    params = nested_params()
    tx = adamx.amsgrad(1e-2, mu_dtype=jnp.bfloat16)
    _, _, state = run(optax_step(tx), params, tx.init(params), grad_sequence(params, 3))
    restored = orbax_roundtrip(state, tmp_path)
    assert isinstance(restored, adamx.AdamState)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
