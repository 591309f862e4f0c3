"""Bad input fails at once, with a message naming the function, the argument, the range, the value."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx

BAD_RANGE = [
    (adamx.adam, dict(learning_rate=1e-3, b1=1.5), "adamx.adam: b1 must be in [0, 1), got 1.5"),
    (adamx.adam, dict(learning_rate=1e-3, b1=-0.1), "adamx.adam: b1 must be in [0, 1), got -0.1"),
    (adamx.adam, dict(learning_rate=1e-3, b2=1.0), "adamx.adam: b2 must be in [0, 1), got 1.0"),
    (adamx.adam, dict(learning_rate=1e-3, b2=math.nan), "adamx.adam: b2 must be in [0, 1), got nan"),
    (adamx.adam, dict(learning_rate=1e-3, eps=-1), "adamx.adam: eps must be finite and >= 0, got -1"),
    (adamx.adam, dict(learning_rate=1e-3, eps_root=-1e-9),
     "adamx.adam: eps_root must be finite and >= 0, got -1e-09"),
    (adamx.adam, dict(learning_rate=-1e-3), "adamx.adam: learning_rate must be finite and >= 0, got -0.001"),
    (adamx.adam, dict(learning_rate=math.inf), "adamx.adam: learning_rate must be finite and >= 0, got inf"),
    (adamx.adam, dict(learning_rate=math.nan), "adamx.adam: learning_rate must be finite and >= 0, got nan"),
    (adamx.adamw, dict(learning_rate=1e-3, weight_decay=-0.1),
     "adamx.adamw: weight_decay must be finite and >= 0, got -0.1"),
    (adamx.amsgrad, dict(learning_rate=1e-3, b1=1.0), "adamx.amsgrad: b1 must be in [0, 1), got 1.0"),
    (adamx.adamax, dict(learning_rate=1e-3, eps=math.nan),
     "adamx.adamax: eps must be finite and >= 0, got nan"),
    (adamx.nadam, dict(learning_rate=1e-3, b2=2), "adamx.adam: b2 must be in [0, 1), got 2"),
    (adamx.scale_by_adam, dict(b1=jnp.asarray(1.5)), "adamx.scale_by_adam: b1 must be in [0, 1)"),
    (adamx.adam, dict(learning_rate=1e-3, mu_dtype=jnp.int8),
     "adamx.adam: mu_dtype must be"),
    (adamx.amsgrad, dict(learning_rate=1e-3, eps_hat=True, max_bias_corrected=True),
     "adamx.amsgrad: eps_hat=True uses the raw second moment"),
]


@pytest.mark.parametrize("factory, kwargs, message", BAD_RANGE)
def test_out_of_range_hyperparameter_raises_value_error_naming_it(factory, kwargs, message):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="fast"), "adamx.adam: learning_rate must be a real number, got 'fast'"),
    (dict(learning_rate=1e-3, b1="0.9"), "adamx.adam: b1 must be a real number, got '0.9'"),
    (dict(learning_rate=1e-3, eps=None), "adamx.adam: eps must be a real scalar, got None"),
    (dict(learning_rate=1e-3, b1=True), "adamx.adam: b1 must be a real number, got True"),
    (dict(learning_rate=1e-3, nesterov="yes"), "adamx.adam: nesterov must be True or False"),
])
def test_non_number_hyperparameter_raises_type_error(kwargs, message):
    with pytest.raises(TypeError) as info:
        adamx.adam(**kwargs)
    assert str(info.value).startswith(message)


def test_pure_update_checks_its_hyperparameters_too():
    state = adamx.init(jnp.ones(2))
    with pytest.raises(ValueError, match=r"adamx.update: b2 must be in \[0, 1\), got 1.0"):
        adamx.update(jnp.ones(2), state, learning_rate=1e-3, b2=1.0)


def test_traced_hyperparameters_are_not_checked():
    @jax.jit
    def step(b1):
        return adamx.update(jnp.ones(2), adamx.init(jnp.ones(2)), learning_rate=0.1, b1=b1)[0]

    assert np.isfinite(np.asarray(step(0.5))).all()


def test_grads_with_another_structure_name_the_first_differing_key():
    state = adamx.init({"a": jnp.ones(2), "b": {"c": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"grads have \['b'\]\['d'\] where the state has \['b'\]\['c'\]"):
        adamx.update({"a": jnp.ones(2), "b": {"d": jnp.ones(3)}}, state, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"only the state have \['b'\]"):
        adamx.update({"a": jnp.ones(2)}, state, learning_rate=0.1)


def test_grads_with_another_shape_name_the_key_and_both_shapes():
    state = adamx.init({"a": jnp.ones(2), "b": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(4, 3\) but the state expects \(3, 4\)"):
        adamx.update({"a": jnp.ones(2), "b": jnp.ones((4, 3))}, state, learning_rate=0.1)


def test_adamw_without_params_says_params_are_needed():
    tx = adamx.adamw(1e-3)
    with pytest.raises(ValueError, match="adamx.adamw: weight decay needs the params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_init_on_an_integer_or_boolean_leaf_names_its_key_path(dtype):
    with pytest.raises(TypeError, match=r"adamx.init: params\['layer'\]\[1\] has dtype"):
        adamx.init({"layer": [jnp.ones(2), jnp.zeros(2, dtype)]})


def test_optax_accepts_what_adamx_rejects():
    # The peer behaviour that motivates the checks: optax builds all of these without complaint.
    for tx in (optax.adam("fast"), optax.adam(1e-3, b1=1.5), optax.adam(1e-3, b1=-0.1)):
        assert tx.init(jnp.ones(2)) is not None
    g = jnp.ones(2)
    nan_updates, _ = optax.adam(1e-3, b2=1.0).update(g, optax.adam(1e-3, b2=1.0).init(g))
    assert np.isnan(np.asarray(nan_updates)).all()
    negative_eps = optax.adam(1e-3, b1=0.5, b2=0.5, eps=-1.0)  # b = 0.5: v_hat is exactly 1
    inf_updates, _ = negative_eps.update(g, negative_eps.init(g))
    assert np.isneginf(np.asarray(inf_updates)).all()


def test_max_bias_corrected_without_an_amsgrad_state_is_rejected():
    with pytest.raises(ValueError, match="max_bias_corrected=True needs an AMSGrad state"):
        adamx.update(jnp.ones(2), adamx.init(jnp.ones(2)), learning_rate=0.1,
                     max_bias_corrected=True)


def test_zero_weight_decay_as_an_array_needs_no_params():
    tx = adamx.adamw(1e-3, weight_decay=np.float32(0))
    updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    np.testing.assert_allclose(updates, -1e-3, rtol=1e-5)


def test_node_type_mismatch_names_the_path_and_both_types():
    state = adamx.init({"a": [jnp.ones(2), jnp.ones(3)]})
    message = r"node type at \['a'\]: grads have a tuple where the state has a list"
    with pytest.raises(ValueError, match=message):
        adamx.update({"a": (jnp.ones(2), jnp.ones(3))}, state, learning_rate=0.1)
