"""adamx against the float64 NumPy oracle of the equations (tests/reference.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adamx
from tests.helpers import apply_step, grad_sequence, leaves64, nested_params, run
from tests.reference import run_reference

STEPS = 60

hyperparams = st.fixed_dictionaries({
    "learning_rate": st.floats(1e-4, 1e-1),
    "b1": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    "b2": st.sampled_from([0.9, 0.99, 0.999, 0.9999]),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
    "eps_root": st.sampled_from([0.0, 1e-10]),
    "weight_decay": st.sampled_from([0.0, 1e-2]),
})


def _adam_step(params, state, grads, hp):
    """Every hyperparameter is a traced argument: one compile serves every hypothesis example."""
    updates, state = adamx.update(grads, state, params, **hp)
    params = optax.apply_updates(params, updates)
    return params, state, params


@settings(max_examples=25, deadline=None)
@given(hp=hyperparams, seed=st.integers(0, 2**16))
def test_adam_matches_reference_equations_float32(hp, seed):
    params = nested_params(seed=seed)
    grads = grad_sequence(params, STEPS, seed=seed + 1)
    traced = {k: jnp.float32(v) for k, v in hp.items()}
    got, _, _ = run(_adam_step, params, adamx.init(params), grads, scan=True, extra=(traced,))
    want = run_reference(
        [leaves64(g) for g in grads], leaves64(params), lr=hp["learning_rate"], b1=hp["b1"],
        b2=hp["b2"], eps=hp["eps"], eps_root=hp["eps_root"], weight_decay=hp["weight_decay"],
    )
    for step in (0, 1, 9, STEPS - 1):
        for g, w in zip(jax.tree.leaves(jax.tree.map(lambda x, s=step: x[s], got)), want[step]):
            # Float32 rounding of params of size ~1 after ~lr-sized steps.
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-6, atol=2e-6)


def test_adam_matches_reference_equations_float64_in_x64_process():
    script = os.path.join(os.path.dirname(__file__), "_x64_reference_check.py")
    env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked" in proc.stdout


def test_first_step_is_learning_rate_times_sign():
    # Closed form: at t = 1, m^ = g and v^ = g^2, so the step is -lr * g / (|g| + eps).
    g = jnp.array([3.0, -0.25, 1e-3, 7e4])
    updates, _ = adamx.update(g, adamx.init(g), learning_rate=0.01, eps=0.0)
    np.testing.assert_array_equal(np.asarray(updates), -0.01 * np.sign(np.asarray(g)))


def test_update_runs_adamax_and_amsgrad_by_option_as_the_reference_equations():
    params = nested_params(seed=3)
    grads = grad_sequence(params, 20, seed=4)
    for options, reference in ((dict(adamax=True), dict(adamax=True)),
                               (dict(amsgrad=True), dict(amsgrad="raw")),
                               (dict(nesterov=True, weight_decay=0.1), dict(nesterov=True,
                                                                            weight_decay=0.1))):
        state = adamx.init(params, amsgrad=options.get("amsgrad", False))
        _, got, _ = run(apply_step(learning_rate=1e-2, **options), params, state, grads)
        want = run_reference([leaves64(g) for g in grads], leaves64(params), lr=1e-2,
                             **reference)[-1]
        for g, w in zip(jax.tree.leaves(got), want):
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-6)


def test_update_refuses_an_option_it_does_not_know():
    state = adamx.init(jnp.ones(2))
    with pytest.raises(TypeError, match="adamx.update: unexpected keyword argument 'lerning_rate'"):
        adamx.update(jnp.ones(2), state, learning_rate=0.1, lerning_rate=0.1)
    with pytest.raises(TypeError, match="adamx.update: missing the keyword argument 'learning_rate'"):
        adamx.update(jnp.ones(2), state)
