"""Where adamx's default differs from optax's, on identical gradients (the cases that match are
in test_parity.py)."""

import optax

import adamx

from ._peers import LR, max_relative_error, run_optax


def test_adamx_amsgrad_default_differs_from_optax_amsgrad(params32, fixed_grads32):
    # optax takes the maximum of the bias-corrected nu; adamx (like torch and Keras) of the raw nu.
    expected = run_optax(optax.amsgrad(LR), params32, fixed_grads32)
    actual = run_optax(adamx.amsgrad(LR), params32, fixed_grads32)
    assert max_relative_error(actual, expected) > 1e-3
