"""adamx against torch.optim on identical gradients: Adam, AdamW, Adamax and their options.

Each case builds a torch optimizer and the adamx transformation that reproduces it, feeds both the
same gradients, and compares parameters after every step.
"""

import pytest
import torch  # a peer in the `parity` extra; missing, this file fails rather than skips

import adamx

from ._cases import FLOAT64, TORCH
from ._peers import LR, assert_trajectories_close, max_relative_error, run_optax, run_torch


@pytest.mark.parametrize("case", list(TORCH))
def test_adamx_matches_torch_float32(case, params32, fixed_grads32):
    build_torch, build_adamx = TORCH[case]
    expected = run_torch(build_torch, params32, fixed_grads32)
    actual = run_optax(build_adamx(), params32, fixed_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("case", FLOAT64["torch"])
def test_adamx_matches_torch_float64(case, check_float64):
    check_float64(f"torch/{case}")


@pytest.mark.parametrize("case", ["adam", "adam_amsgrad", "adam_coupled_weight_decay", "adamw", "adamax"])
def test_adamx_matches_torch_on_quadratic_loss_gradients(case, params32, quadratic_grads32):
    build_torch, build_adamx = TORCH[case]
    expected = run_torch(build_torch, params32, quadratic_grads32)
    actual = run_optax(build_adamx(), params32, quadratic_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


def test_torch_amsgrad_takes_max_of_raw_nu_not_optax_form(params32, fixed_grads32):
    expected = run_torch(lambda p: torch.optim.Adam(p, lr=LR, amsgrad=True), params32, fixed_grads32)
    optax_form = run_optax(adamx.amsgrad(LR, max_bias_corrected=True), params32, fixed_grads32)
    assert max_relative_error(optax_form, expected) > 1e-3


def test_torch_nadam_is_not_optax_nadam(params32, fixed_grads32):
    # torch's NAdam follows Dozat's momentum-decay schedule; adamx.nadam is optax's form.
    expected = run_torch(lambda p: torch.optim.NAdam(p, lr=LR), params32, fixed_grads32)
    actual = run_optax(adamx.nadam(LR), params32, fixed_grads32)
    assert max_relative_error(actual, expected) > 1e-3
