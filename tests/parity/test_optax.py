"""adamx against optax on identical gradients: adam, adamw (masked), amsgrad, nadam(w), adamax."""

import optax
import pytest

import adamx

from ._cases import FLOAT64, OPTAX
from ._peers import LR, assert_trajectories_close, max_relative_error, run_optax


@pytest.mark.parametrize("case", list(OPTAX))
def test_adamx_matches_optax_float32(case, params32, fixed_grads32):
    build_optax, build_adamx = OPTAX[case]
    expected = run_optax(build_optax(), params32, fixed_grads32)
    actual = run_optax(build_adamx(), params32, fixed_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("case", FLOAT64["optax"])
def test_adamx_matches_optax_float64(case, check_float64):
    check_float64(f"optax/{case}")


@pytest.mark.parametrize("case", ["adam", "amsgrad", "nadamw_mask"])
def test_adamx_matches_optax_on_quadratic_loss_gradients(case, params32, quadratic_grads32):
    build_optax, build_adamx = OPTAX[case]
    expected = run_optax(build_optax(), params32, quadratic_grads32)
    actual = run_optax(build_adamx(), params32, quadratic_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


def test_adamx_amsgrad_default_differs_from_optax_amsgrad(params32, fixed_grads32):
    # optax takes the maximum of the bias-corrected nu; adamx (like torch and Keras) of the raw nu.
    expected = run_optax(optax.amsgrad(LR), params32, fixed_grads32)
    actual = run_optax(adamx.amsgrad(LR), params32, fixed_grads32)
    assert max_relative_error(actual, expected) > 1e-3
