"""Where keras.optimizers (JAX backend) differ from adamx's defaults, on identical gradients (the
cases that match are in test_parity.py)."""

import keras  # a peer in the `parity` extra; missing, this file fails rather than skips
import pytest

import adamx

from ._cases import KERAS, KERAS_PREPARE, MASK
from ._peers import LR, WD, max_relative_error, run_keras, run_optax


@pytest.fixture(scope="module")
def keras_adam_defaults(params32, fixed_grads32):
    """Keras's Adam with every default but the learning rate."""
    return run_keras(lambda: keras.optimizers.Adam(learning_rate=LR), params32, fixed_grads32)


def test_keras_runs_on_the_jax_backend():
    assert keras.backend.backend() == "jax"


def test_keras_adam_is_not_plain_adam_with_keras_epsilon(keras_adam_defaults, params32, fixed_grads32):
    plain = run_optax(adamx.adam(LR, eps=1e-7), params32, fixed_grads32)
    assert max_relative_error(plain, keras_adam_defaults) > 1e-3


def test_keras_default_epsilon_is_not_adamx_default(keras_adam_defaults, params32, fixed_grads32):
    # Keras's Adam defaults to epsilon=1e-7; adamx (like optax and torch) to 1e-8.
    adamx_default_eps = run_optax(adamx.adam(LR, eps_hat=True), params32, fixed_grads32)
    assert max_relative_error(adamx_default_eps, keras_adam_defaults) > 1e-3


def test_keras_weight_decay_exclusion_matters(params32, fixed_grads32):
    # Guards the adamw_exclude case: Keras really skipped the excluded leaves.
    build_keras, _ = KERAS["adamw_exclude"]
    excluded = run_keras(build_keras, params32, fixed_grads32, prepare=KERAS_PREPARE["adamw_exclude"])
    unmasked = run_optax(adamx.adamw(LR, eps=1e-7, eps_hat=True, weight_decay=WD), params32, fixed_grads32)
    assert any(not decayed for decayed in MASK.values())
    assert max_relative_error(unmasked, excluded) > 1e-3


def test_keras_nadam_is_not_optax_nadam(params32, fixed_grads32):
    # Keras's Nadam uses Dozat's momentum schedule b1 * (1 - 0.5 * 0.96**t); adamx.nadam is optax's.
    expected = run_keras(lambda: keras.optimizers.Nadam(learning_rate=LR), params32, fixed_grads32)
    actual = run_optax(adamx.nadam(LR, eps=1e-7, eps_hat=True), params32, fixed_grads32)
    assert max_relative_error(actual, expected) > 1e-3
