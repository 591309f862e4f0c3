"""adamx against each peer on identical gradients: every case of ``_cases.py`` (optax, torch.optim
and keras.optimizers, each with the adamx options that reproduce it) in float32 on fixed and on
quadratic-loss gradients, and one per convention in float64 (to 1e-10, from an x64 process)."""

import pytest

from ._cases import FLOAT64, PEERS, run_case
from ._peers import assert_trajectories_close

QUADRATIC = [("optax", "adam"), ("optax", "amsgrad"), ("optax", "nadamw_mask"),
             ("torch", "adam"), ("torch", "adam_amsgrad"), ("torch", "adam_coupled_weight_decay"),
             ("torch", "adamw"), ("torch", "adamax"), ("keras", "adam_amsgrad")]


@pytest.mark.parametrize("peer, case", [(p, c) for p, cases in PEERS.items() for c in cases])
def test_adamx_matches_the_peer_float32(peer, case, params32, fixed_grads32):
    expected, actual = run_case(peer, case, params32, fixed_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("peer, case", QUADRATIC)
def test_adamx_matches_the_peer_on_quadratic_loss_gradients(peer, case, params32,
                                                            quadratic_grads32):
    expected, actual = run_case(peer, case, params32, quadratic_grads32)
    assert_trajectories_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("key", [f"{p}/{c}" for p, cases in FLOAT64.items() for c in cases])
def test_adamx_matches_the_peer_float64(key, check_float64):
    check_float64(key)
