"""Where torch.optim's conventions are not optax's, on identical gradients (the cases that match
are in test_parity.py)."""

import torch  # a peer in the `parity` extra; missing, this file fails rather than skips

import adamx

from ._peers import LR, max_relative_error, run_optax, run_torch


def test_torch_amsgrad_takes_max_of_raw_nu_not_optax_form(params32, fixed_grads32):
    expected = run_torch(lambda p: torch.optim.Adam(p, lr=LR, amsgrad=True), params32, fixed_grads32)
    optax_form = run_optax(adamx.amsgrad(LR, max_bias_corrected=True), params32, fixed_grads32)
    assert max_relative_error(optax_form, expected) > 1e-3


def test_torch_nadam_is_not_optax_nadam(params32, fixed_grads32):
    # torch's NAdam follows Dozat's momentum-decay schedule; adamx.nadam is optax's form.
    expected = run_torch(lambda p: torch.optim.NAdam(p, lr=LR), params32, fixed_grads32)
    actual = run_optax(adamx.nadam(LR), params32, fixed_grads32)
    assert max_relative_error(actual, expected) > 1e-3
