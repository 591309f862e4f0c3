"""adamx as a drop-in optax transformation: each composition equals the same run with optax.adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.helpers import grad_sequence, nested_params, optax_step, run

STEPS = 40


def assert_same_run(tx_adamx, tx_optax, *, steps=STEPS, grads=None, rtol=2e-5, atol=1e-6):
    params = nested_params()
    grads = grads or grad_sequence(params, steps)
    got, _, _ = run(optax_step(tx_adamx), params, tx_adamx.init(params), grads)
    want, _, _ = run(optax_step(tx_optax), params, tx_optax.init(params), grads)
    for g_step, w_step in zip(got, want):
        for g, w in zip(jax.tree.leaves(g_step), jax.tree.leaves(w_step)):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_adam_matches_optax_adam():
    assert_same_run(adamx.adam(1e-2), optax.adam(1e-2))


def test_adam_with_eps_root_matches_optax():
    assert_same_run(adamx.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8),
                    optax.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8))


def test_adamw_matches_optax_adamw():
    assert_same_run(adamx.adamw(1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1))


def test_adamw_mask_matches_optax_adamw_mask():
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731  decay matrices only
    assert_same_run(adamx.adamw(1e-2, weight_decay=0.3, mask=mask),
                    optax.adamw(1e-2, weight_decay=0.3, mask=mask))


def test_scale_by_adam_chains_like_optax():
    assert_same_run(optax.chain(adamx.scale_by_adam(), optax.scale(-1e-2)),
                    optax.chain(optax.scale_by_adam(), optax.scale(-1e-2)))


def test_chain_with_clip_by_global_norm_matches_optax():
    assert_same_run(optax.chain(optax.clip_by_global_norm(1.0), adamx.adam(1e-2)),
                    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))


def test_schedule_reads_adam_state_count_like_optax():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, STEPS)
    assert_same_run(adamx.adam(schedule), optax.adam(schedule))


def test_weight_decay_schedule_matches_optax_adamw():
    # optax.adamw takes a schedule for weight_decay too, read at the count before the step
    schedule = optax.linear_schedule(0.3, 0.0, STEPS // 2)
    assert_same_run(adamx.adamw(1e-2, weight_decay=schedule),
                    optax.adamw(1e-2, weight_decay=schedule))


def test_inject_hyperparams_matches_optax():
    tx = optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2, b1=0.8)
    ref = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.8)
    assert_same_run(tx, ref)


def test_inject_hyperparams_learning_rate_change_takes_effect():
    tx = optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2)
    params = jnp.ones(3)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    updates, _ = tx.update(jnp.array([1.0, -1.0, 2.0]), state)
    np.testing.assert_allclose(updates, [-0.5, 0.5, -0.5], rtol=1e-6)


def test_multisteps_matches_optax():
    assert_same_run(optax.MultiSteps(adamx.adam(1e-2), every_k_schedule=3),
                    optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3))


def test_masked_matches_optax():
    mask = {"dense": {"w": True, "b": False}, "layers": [True, (False, None)], "scale": True}
    assert_same_run(optax.masked(adamx.adam(1e-2), mask), optax.masked(optax.adam(1e-2), mask))


def test_apply_if_finite_skips_a_nan_step_without_touching_params_or_state():
    params = nested_params()
    grads = grad_sequence(params, 6)
    grads[3] = jax.tree.map(lambda g: g.at[...].set(jnp.nan) if g.ndim else g, grads[3])
    tx = optax.apply_if_finite(adamx.adam(1e-2), max_consecutive_errors=5)
    history, _, _ = run(optax_step(tx), params, tx.init(params), grads)
    for before, after in zip(jax.tree.leaves(history[2]), jax.tree.leaves(history[3])):
        np.testing.assert_array_equal(before, after)
    # The skipped step left the inner state as it was: the rest equals a run without that step.
    tx = adamx.adam(1e-2)
    clean, _, _ = run(optax_step(tx), params, tx.init(params), grads[:3] + grads[4:])
    for g, w in zip(jax.tree.leaves(history[-1]), jax.tree.leaves(clean[-1])):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_init_returns_adam_state_itself():
    state = adamx.adam(1e-3).init(nested_params())
    assert isinstance(state, adamx.AdamState)


@pytest.mark.parametrize("factory", [adamx.adam, adamx.adamw, adamx.nadam, adamx.amsgrad])
def test_none_and_masked_node_leaves_pass_through(factory):
    params = {"a": jnp.ones(2), "b": None, "c": optax.MaskedNode()}
    tx = factory(1e-2)
    updates, state = tx.update({"a": jnp.ones(2), "b": None, "c": optax.MaskedNode()},
                               tx.init(params), params)
    assert updates["b"] is None and isinstance(updates["c"], optax.MaskedNode)
    assert state.mu["b"] is None and isinstance(state.nu["c"], optax.MaskedNode)
