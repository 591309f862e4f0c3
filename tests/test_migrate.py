"""Moving a running job from optax to adamx and back: the oracle is optax continuing the same job.

A job runs a few steps under optax; its state converted with ``adamx.from_optax`` continues under
the adamx factory of the same name, step for step as optax continues (to optax's float32 bias
correction). ``adamx.to_optax`` takes it back, and a conversion there and back returns the very
arrays it started from.
"""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import adamx
from tests.helpers import assert_trees_equal, grad_sequence, optax_step, run

STEPS = 4
MASK = {"w": True, "b": False}
# (optax's transformation, adamx's), built the same way; optax.amsgrad keeps the maximum of the
# bias-corrected second moment, which adamx.amsgrad keeps with max_bias_corrected=True.
PAIRS = {
    "adam": (optax.adam(0.05), adamx.adam(0.05)),
    "adam, schedule": (optax.adam(optax.linear_schedule(0.05, 0.01, 10)),
                       adamx.adam(optax.linear_schedule(0.05, 0.01, 10))),
    "adamw, mask": (optax.adamw(0.05, weight_decay=0.1, mask=MASK),
                    adamx.adamw(0.05, weight_decay=0.1, mask=MASK)),
    "nadam": (optax.nadam(0.05), adamx.nadam(0.05)),
    "nadamw": (optax.nadamw(0.05, weight_decay=0.1), adamx.nadamw(0.05, weight_decay=0.1)),
    "amsgrad": (optax.amsgrad(0.05), adamx.amsgrad(0.05, max_bias_corrected=True)),
    "adamax": (optax.adamax(0.05), adamx.adamax(0.05)),
    "adamaxw": (optax.adamaxw(0.05, weight_decay=0.1), adamx.adamaxw(0.05, weight_decay=0.1)),
    "scale_by_adam in a chain": (
        optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-0.05)),
        optax.chain(optax.clip_by_global_norm(1.0), adamx.scale_by_adam(), optax.scale(-0.05))),
    "scale_by_amsgrad": (optax.chain(optax.scale_by_amsgrad(), optax.scale(-0.05)),
                         optax.chain(adamx.scale_by_amsgrad(max_bias_corrected=True),
                                     optax.scale(-0.05))),
    "scale_by_adamax": (optax.chain(optax.scale_by_adamax(), optax.scale(-0.05)),
                        optax.chain(adamx.scale_by_adamax(), optax.scale(-0.05))),
    "inject_hyperparams": (optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
                           optax.inject_hyperparams(adamx.adam)(learning_rate=0.05)),
    "MultiSteps": (optax.MultiSteps(optax.adam(0.05), every_k_schedule=2),
                   optax.MultiSteps(adamx.adam(0.05), every_k_schedule=2)),
}


def problem():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.array([0.5, -0.25])}
    return params, grad_sequence(params, 3 * STEPS, seed=4)


def assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_an_optax_job_continues_under_adamx_as_under_optax_and_goes_back(name):
    peer, tx = PAIRS[name]
    params, grads = problem()
    _, params, optax_state = run(optax_step(peer), params, peer.init(params), grads[:STEPS])
    # a chain of scale_by_amsgrad and a scale has optax.amsgrad's structure: the adamx state says
    # which one it is; for the aliases, from_optax needs nothing more
    chained = name.startswith("scale_by_am") or name.startswith("scale_by_adamax")
    state = adamx.from_optax(optax_state, tx.init(params) if chained else None)
    # the converted state is what the adamx transformation's init builds, filled in
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    # there and back returns the very arrays
    assert_trees_equal(adamx.to_optax(state, peer.init(params)), optax_state)
    theirs, p_theirs, s_theirs = run(optax_step(peer), params, optax_state, grads[STEPS:2 * STEPS])
    mine, p_mine, s_mine = run(optax_step(tx), params, state, grads[STEPS:2 * STEPS])
    assert_close(mine, theirs)
    # back to optax after adamx's steps: optax continues as adamx does
    back = adamx.to_optax(s_mine, peer.init(params))
    later_theirs, _, _ = run(optax_step(peer), p_mine, back, grads[2 * STEPS:])
    later_mine, _, _ = run(optax_step(tx), p_mine, s_mine, grads[2 * STEPS:])
    assert_close(later_theirs, later_mine)


def test_an_orbax_checkpoint_of_optax_adam_restores_into_adamx_and_back(tmp_path):
    params, grads = problem()
    peer, tx = optax.adam(0.05), adamx.adam(0.05)
    _, params, optax_state = run(optax_step(peer), params, peer.init(params), grads[:STEPS])
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "optax", optax_state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "optax", jax.eval_shape(peer.init, params))
        state = adamx.from_optax(restored)
        theirs, _, _ = run(optax_step(peer), params, optax_state, grads[STEPS:])
        mine, _, s_mine = run(optax_step(tx), params, state, grads[STEPS:])
        assert_close(mine, theirs)
        # and an adamx checkpoint converted back restores into optax.adam's own target
        checkpointer.save(tmp_path / "back", adamx.to_optax(s_mine, peer.init(params)))
        checkpointer.wait_until_finished()
        back = checkpointer.restore(tmp_path / "back", jax.eval_shape(peer.init, params))
    assert_trees_equal(adamx.from_optax(back), s_mine)


def test_a_flax_train_state_moves_to_adamx_and_keeps_training_as_optax_would():
    params, grads = problem()

    def train(ts, grads):
        for g in grads:
            ts = ts.apply_gradients(grads=g)
        return ts

    ts = train(train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.05)),
               grads[:STEPS])
    # a flax state dict, as a checkpoint saved with optax holds it
    saved = flax.serialization.to_state_dict(ts)
    restored = flax.serialization.from_state_dict(
        train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.05)), saved)
    moved = restored.replace(tx=adamx.adam(0.05), opt_state=adamx.from_optax(restored.opt_state))
    assert_close(train(moved, grads[STEPS:]).params, train(ts, grads[STEPS:]).params)


def test_a_schedule_that_counted_other_steps_than_the_moments_is_refused():
    params, _ = problem()
    peer = optax.adam(optax.linear_schedule(0.05, 0.01, 10))
    state = peer.init(params)
    state = (state[0], state[1]._replace(count=jnp.int32(3)))
    with pytest.raises(ValueError, match="adamx.from_optax: the learning-rate schedule has "
                                         "counted 3 steps and the moments 0"):
        adamx.from_optax(state)


def test_what_optax_cannot_hold_is_refused_not_dropped():
    params = {"w": jnp.zeros((64, 128))}
    like = optax.adam(0.1).init(params)
    with pytest.raises(ValueError, match="adamx.to_optax: optax keeps float moments"):
        adamx.to_optax(adamx.adam(0.1, mu_dtype="int8").init(params), like)
    bf16 = {"w": jnp.zeros((64, 128), jnp.bfloat16)}
    with pytest.raises(ValueError, match="adamx.to_optax: optax keeps no Kahan compensation"):
        adamx.to_optax(adamx.adam(0.1, param_rounding="kahan").init(bf16), optax.adam(0.1).init(bf16))
    with pytest.raises(ValueError, match="adamx.to_optax: like is not AMSGrad's state, and state "
                                         "has nu_max"):
        adamx.to_optax(adamx.amsgrad(0.1).init(params), like)
    with pytest.raises(ValueError, match="adamx.from_optax: state holds no optax Adam-family"):
        adamx.from_optax(optax.sgd(0.1).init(params))


def test_a_float16_second_moment_is_widened_exactly():
    params = {"w": jnp.linspace(-1, 1, 8, dtype=jnp.float16)}
    peer = optax.adam(0.05)
    _, _, optax_state = run(optax_step(peer), params, peer.init(params),
                            grad_sequence(params, 2))
    state = adamx.from_optax(optax_state)
    assert state.nu["w"].dtype == jnp.float32
    np.testing.assert_array_equal(state.nu["w"], optax_state[0].nu["w"].astype(jnp.float32))
    adamx.adam(0.05).update(params, state, params)  # adamx takes it
    back = adamx.to_optax(state, peer.init(params))  # and gives it back in float16, exactly
    assert_trees_equal(back, optax_state)


def test_the_moments_of_other_params_are_refused_both_ways():
    params = {"w": jnp.ones((4, 5)), "b": jnp.ones(3)}
    other = {"z": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"adamx.to_optax: the mu of state and like are the "
                                         r"moments of different params: only state has \['z'\]; "
                                         r"only like has \['b'\], \['w'\]"):
        adamx.to_optax(adamx.adam(0.1).init(other), optax.adam(0.1).init(params))
    reshaped = {"w": jnp.ones((5, 4)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"adamx.from_optax: mu\['w'\] has shape \(4, 5\) in "
                                         r"state and \(5, 4\) in like"):
        adamx.from_optax(optax.adam(0.1).init(params), adamx.adam(0.1).init(reshaped))
    with pytest.raises(ValueError, match="adamx.from_optax: like is AMSGrad's state, and the "
                                         "optax state has no nu_max"):
        adamx.from_optax(optax.adam(0.1).init(params), adamx.amsgrad(0.1).init(params))


def test_an_integer_param_keeps_no_moment_in_adamx_and_optax_zeros_going_back():
    # optax's init gives an integer param integer zero moments; adamx keeps None for it.
    params = {"w": jnp.ones(3), "i": jnp.arange(3)}
    peer = optax.adam(0.1)
    state = adamx.from_optax(peer.init(params))
    assert state.mu["i"] is None and state.nu["i"] is None
    updates, _ = adamx.adam(0.1).update({"w": jnp.ones(3), "i": jnp.zeros(3, jnp.int32)}, state)
    np.testing.assert_array_equal(updates["i"], 0)
    assert_trees_equal(adamx.to_optax(state, peer.init(params)), peer.init(params))


def test_a_complex_param_moves_from_optax_and_continues_as_optax():
    # optax keeps a complex param's second moment complex (imaginary part 0); adamx keeps it real.
    params = {"c": jnp.array([1 + 2j, -0.5j], jnp.complex64)}
    grads = grad_sequence(params, 4)
    peer = optax.adam(0.05)
    _, _, optax_state = run(optax_step(peer), params, peer.init(params), grads[:2])
    state = adamx.from_optax(optax_state)
    assert state.nu["c"].dtype == jnp.float32
    np.testing.assert_array_equal(state.nu["c"], optax_state[0].nu["c"].real)
    mine, _ = adamx.adam(0.05).update(grads[2], state, params)
    theirs, _ = peer.update(grads[2], optax_state, params)
    np.testing.assert_allclose(mine["c"], theirs["c"], rtol=1e-5)
    assert_trees_equal(adamx.to_optax(state, peer.init(params)), optax_state)
