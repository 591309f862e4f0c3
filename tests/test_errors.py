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
    # nadam is adam with nesterov=True (a partial, as in optax), so adam checks its arguments
    (adamx.nadam, dict(learning_rate=1e-3, b2=2), "adamx.adam: b2 must be in [0, 1), got 2"),
    (adamx.scale_by_adam, dict(b1=jnp.asarray(1.5)), "adamx.scale_by_adam: b1 must be in [0, 1)"),
    (adamx.adam, dict(learning_rate=1e-3, mu_dtype=jnp.int8),
     "adamx.adam: mu_dtype must be"),
    (adamx.amsgrad, dict(learning_rate=1e-3, eps_hat=True, max_bias_corrected=True),
     "adamx.amsgrad: eps_hat=True moves the second moment's bias correction onto the step"),
    # finite in float64, infinite in float32 (the dtype the math runs in)
    (adamx.adam, dict(learning_rate=1e39), "adamx.adam: learning_rate must be finite in float32"),
    (adamx.adam, dict(learning_rate=1e-3, eps=1e39), "adamx.adam: eps must be finite in float32"),
    (adamx.adamw, dict(learning_rate=1e-3, weight_decay=1e39),
     "adamx.adamw: weight_decay must be finite in float32"),
    (adamx.adam, dict(learning_rate=jnp.asarray(1.5, jnp.bfloat16), b1=jnp.asarray(1.5, jnp.bfloat16)),
     "adamx.adam: b1 must be in [0, 1), got Array(1.5, dtype=bfloat16)"),
    (adamx.adam, dict(learning_rate=1e-3, mu_dtype=jnp.float8_e4m3fn), "adamx.adam: mu_dtype must be"),
    (adamx.adam, dict(learning_rate=1e-3, nu_dtype=jnp.complex64), "adamx.adam: nu_dtype must be"),
    (adamx.adam, dict(learning_rate=1e-3, param_rounding="up"),
     "adamx.adam: param_rounding must be one of 'nearest', 'stochastic', 'kahan', got 'up'"),
    (adamx.adam, dict(learning_rate=1e-3, seed=-1), "adamx.adam: seed must be in [0, 2**32), got -1"),
]


@pytest.mark.parametrize("factory, kwargs, message", BAD_RANGE)
def test_out_of_range_hyperparameter_raises_value_error_naming_it(factory, kwargs, message):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="fast"), "adamx.adam: learning_rate must be a real number, got 'fast'"),
    (dict(learning_rate=1e-3, b1="0.9"), "adamx.adam: b1 must be a real number, got '0.9'"),
    (dict(learning_rate=1e-3, eps=None), "adamx.adam: eps must be a real number, got None"),
    (dict(learning_rate=None), "adamx.adam: learning_rate must be a number, an array or a schedule"),
    (dict(learning_rate=1e-3, eps=jnp.ones(2)), "adamx.adam: eps must be a real scalar"),
    (dict(learning_rate=1e-3, seed=1.5), "adamx.adam: seed must be an integer, got 1.5"),
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
    with pytest.raises(ValueError, match=r"grads have \['b'\]\['d'\] where state.mu has \['b'\]\['c'\]"):
        adamx.update({"a": jnp.ones(2), "b": {"d": jnp.ones(3)}}, state, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"only state.mu has \['b'\]"):
        adamx.update({"a": jnp.ones(2)}, state, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"differ in tree structure: only state.mu has \['a'\]$"):
        adamx.update({"b": {"c": jnp.ones(3)}}, state, learning_rate=0.1)  # not "grads have ['b']"


def test_grads_with_another_shape_name_the_key_and_both_shapes():
    state = adamx.init({"a": jnp.ones(2), "b": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"state.mu\['b'\] has shape \(3, 4\) where the grads have \(4, 3\)"):
        adamx.update({"a": jnp.ones(2), "b": jnp.ones((4, 3))}, state, learning_rate=0.1)


def test_adamw_without_params_says_params_are_needed():
    tx = adamx.adamw(1e-3)
    with pytest.raises(ValueError, match="adamx.adamw: weight decay needs the params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


@pytest.mark.parametrize("params, shape", [({"w": jnp.ones((3, 1))}, r"\(3, 1\)"),
                                           ({"w": jnp.array([100.0])}, r"\(1,\)")])
def test_params_of_another_shape_than_the_grads_are_refused_not_broadcast(params, shape):
    # optax broadcasts the decay of a (1,) param over a (3,) update; adamx names the leaf
    grads, state = {"w": jnp.ones(3)}, adamx.init({"w": jnp.ones(3)})
    message = rf"params\['w'\] has shape {shape} where the grads have \(3,\)"
    tx = adamx.adamw(1e-2, weight_decay=0.5)
    with pytest.raises(ValueError, match="adamx.adamw: " + message):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="adamx.apply: " + message):
        adamx.apply(grads, state, params, learning_rate=1e-2)
    with pytest.raises(ValueError, match="adamx.adam: " + message):
        adamx.adam(1e-2, param_rounding="stochastic").update(grads, state, params)


def test_state_messages_name_dtypes_and_shapes_under_jit_too():
    state = adamx.AdamState(count=jnp.int32(0), mu={"i": jnp.ones(3)}, nu={"i": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"adamx.adam: state.mu\['i'\] must be None for an integer "
                                        r"or float0 gradient .*, got float32\[3\]"):
        jax.jit(lambda s: adamx.adam(1.0).update({"i": jnp.ones(3, jnp.int32)}, s))(state)
    without_mu = adamx.init(jnp.ones(3)).replace(mu=None)
    with pytest.raises(ValueError, match="adamx.update: state.mu must be a float array for a float "
                                         "gradient, got None"):
        adamx.update(jnp.ones(3), without_mu, learning_rate=0.1)


def test_apply_without_params_is_refused():
    with pytest.raises(TypeError, match="adamx.apply: params must be the params' pytree"):
        adamx.apply(jnp.ones(3), adamx.init(jnp.ones(3)), None, learning_rate=1e-2)


@pytest.mark.parametrize("schedule, error, message", [
    (lambda count: None, TypeError, "the learning_rate schedule returned None"),
    (lambda count: "fast", TypeError, r"learning_rate \(the schedule's value\) must be a real number, "
                                      "got 'fast'"),
    (lambda count: jnp.ones(2), TypeError, r"learning_rate \(the schedule's value\) must be a real "
                                           "scalar"),
    (lambda count: -0.1, ValueError, r"learning_rate \(the schedule's value\) must be finite and "
                                     ">= 0, got -0.1"),
])
def test_a_schedule_value_is_checked_as_a_number_passed_directly_would_be(schedule, error, message):
    # a schedule returning None used to take scale_by_adam's no-learning-rate path: a unit step uphill
    tx = adamx.adam(schedule)
    with pytest.raises(error, match="adamx.adam: " + message):
        tx.update(jnp.ones(3), tx.init(jnp.ones(3)))


def test_traced_hyperparameters_of_another_shape_or_dtype_are_refused_by_their_type():
    state = adamx.init(jnp.ones(3))
    with pytest.raises(TypeError, match=r"adamx.update: learning_rate must be a real scalar, got "
                                        r"a traced float32\[2\]"):
        jax.jit(lambda lr: adamx.update(jnp.ones(3), state, learning_rate=lr))(jnp.ones(2))
    with pytest.raises(TypeError, match=r"adamx.update: b1 must be a real scalar, got a traced "
                                        r"complex64\[\]"):
        jax.jit(lambda b1: adamx.update(jnp.ones(3), state, learning_rate=0.1, b1=b1))(
            jnp.complex64(0.5))
    tx = adamx.adam(lambda count: jnp.full(2, 0.1))
    with pytest.raises(TypeError, match=r"adamx.adam: learning_rate \(the schedule's value\) must "
                                        r"be a real scalar, got a traced float32\[2\]"):
        jax.jit(tx.update)(jnp.ones(3), tx.init(jnp.ones(3)))


def test_optax_builds_and_steps_what_adamx_rejects():
    # The deviation the README documents: optax 0.2.8 checks no hyperparameter (b1=1.5 steps,
    # b2=1.0 gives NaN); when it starts to, this fails and the README's table loses a row.
    for kwargs in (dict(learning_rate=1e-3, b1=1.5), dict(learning_rate=1e-3, b1=-0.1),
                   dict(learning_rate=1e-3, b2=1.0)):
        tx = optax.adam(**kwargs)
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
        with pytest.raises(ValueError, match="adamx.adam: b[12] must be in"):
            adamx.adam(**kwargs)


def test_max_bias_corrected_without_amsgrad_is_rejected():
    with pytest.raises(ValueError, match=r"max_bias_corrected=True is an AMSGrad option"):
        adamx.update(jnp.ones(2), adamx.init(jnp.ones(2)), learning_rate=0.1,
                     max_bias_corrected=True)


def test_zero_weight_decay_as_an_array_needs_no_params():
    tx = adamx.adamw(1e-3, weight_decay=np.float32(0))
    updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    np.testing.assert_allclose(updates, -1e-3, rtol=1e-5)


def test_node_type_mismatch_names_the_path_and_both_types():
    state = adamx.init({"a": [jnp.ones(2), jnp.ones(3)]})
    message = r"at \['a'\] grads have a tuple where state.mu has a list"
    with pytest.raises(ValueError, match=message):
        adamx.update({"a": (jnp.ones(2), jnp.ones(3))}, state, learning_rate=0.1)


def test_bfloat16_hyperparameter_arrays_are_accepted_and_match_optax():
    params = jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)
    grads = jnp.cos(jnp.arange(8.0)).astype(jnp.bfloat16)
    lr = jnp.asarray(1e-2, jnp.bfloat16)
    pairs = [(adamx.adam(lr), optax.adam(lr)),
             # inject_hyperparams hands the factory arrays of the params' dtype (0.5 and 0.75
             # are exact in bfloat16)
             (optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2, b1=0.5, b2=0.75),
              optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.5, b2=0.75))]
    for ours, peer in pairs:
        u, _ = ours.update(grads, ours.init(params), params)
        want, _ = peer.update(grads, peer.init(params), params)
        assert u.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2)


def test_a_decay_rate_rounded_to_one_in_bfloat16_is_refused_with_the_remedy():
    tx = optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2)  # b2 = 0.999 -> bfloat16 1.0
    with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\), got Array\(1, dtype=bfloat16\): "
                                         r".*hyperparam_dtype=jnp.float32"):
        tx.init(jnp.ones(3, jnp.bfloat16))


def _state_with(**changes):
    return adamx.init({"a": jnp.ones(3), "b": jnp.ones((2, 2))}).replace(**changes)


GRADS = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}


@pytest.mark.parametrize("changes, message", [
    (dict(nu={"a": jnp.zeros(3), "b": jnp.zeros((2, 2)), "c": jnp.zeros(1)}),
     r"grads and state.nu differ in tree structure: only state.nu has \['c'\]"),
    (dict(nu={"a": jnp.zeros((3, 3)), "b": jnp.zeros((2, 2))}),
     r"state.nu\['a'\] has shape \(3, 3\) where the grads have \(3,\)"),
    (dict(nu={"a": jnp.zeros(3, jnp.complex64), "b": jnp.zeros((2, 2))}),
     r"state.nu\['a'\] must be real, got complex64"),
    (dict(mu={"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros((2, 2))}),
     r"state.mu\['a'\] must be a float array for a float gradient, got int32"),
    (dict(mu=None), r"grads and state.mu differ in tree structure"),
    (dict(count=jnp.float32(3)), r"state.count must be an int32 scalar, got float32\[\]"),
    (dict(count=jnp.zeros(1, jnp.int32)), r"state.count must be an int32 scalar, got int32\[1\]"),
    (dict(count=jnp.int32(-1)), r"state.count must be >= 0, got -1"),
    (dict(nu_max={"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}),
     r"the state has nu_max \(AMSGrad's maximum\), but this transformation is not AMSGrad"),
    (dict(compensation={"a": None, "b": None}),
     r"the state has a compensation buffer, but param_rounding is not 'kahan'"),
])
def test_a_state_that_does_not_fit_is_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        adamx.update(GRADS, _state_with(**changes), learning_rate=0.1)
    tx = adamx.adam(0.1)
    with pytest.raises(ValueError, match=message.replace("adamx.update", "adamx.adam")):
        tx.update(GRADS, _state_with(**changes))


def test_the_transformation_decides_the_algorithm_not_the_state():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="adamx.adam: the state has nu_max"):
        adamx.adam(0.1).update(params, adamx.amsgrad(0.1).init(params))
    with pytest.raises(ValueError, match="adamx.amsgrad: the state has no nu_max"):
        adamx.amsgrad(0.1).update(params, adamx.adam(0.1).init(params))
    with pytest.raises(ValueError, match="adamx.update: the state has nu_max"):
        adamx.update(params, adamx.init(params, amsgrad=True), learning_rate=0.1)
    with pytest.raises(ValueError, match="adamx.adam: the state has no compensation buffer, but "
                                         "param_rounding is 'kahan'"):
        adamx.adam(0.1, param_rounding="kahan").update(
            {"w": jnp.ones(3, jnp.bfloat16)}, adamx.init({"w": jnp.ones(3, jnp.bfloat16)}))


def test_an_amsgrad_checkpoint_restored_into_an_adam_target_is_refused(tmp_path):
    import flax.serialization

    params = {"w": jnp.ones(3)}
    saved = flax.serialization.to_state_dict(adamx.amsgrad(0.1).init(params))
    restored = flax.serialization.from_state_dict(adamx.adam(0.1).init(params), saved)
    with pytest.raises(ValueError, match="adamx.adam: the state has nu_max"):
        adamx.adam(0.1).update(params, restored)


@pytest.mark.parametrize("optax_tx", [optax.adam(0.1), optax.adamw(0.1), optax.scale_by_adam()])
def test_an_optax_state_names_adam_state_and_the_conversion(optax_tx):
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"adamx.adam: state must be an adamx.AdamState .* an "
                                        r"optax state: convert it with adamx.from_optax\(state\)"):
        adamx.adam(0.1).update(params, optax_tx.init(params))


def test_traced_hyperparameters_are_checked_under_checkify_on_request():
    from jax.experimental import checkify

    params = jnp.ones(3)

    def step(b2, count):
        state = adamx.init(params).replace(count=count)
        return adamx.update(jnp.ones(3), state, learning_rate=0.1, b2=b2)[0]

    # A plain jitted step cannot check a traced value: the bad value goes through as NaN ...
    assert np.isnan(np.asarray(jax.jit(step)(1.0, jnp.int32(0)))).all()

    def checked_step(b2, count):
        adamx.check_hyperparams(b2=b2, count=count)
        return step(b2, count)

    checked = jax.jit(checkify.checkify(checked_step))
    error, _ = checked(1.0, jnp.int32(0))
    with pytest.raises(checkify.JaxRuntimeError, match=r"b2 must be in \[0, 1\), got 1.0"):
        error.throw()
    error, _ = checked(0.5, jnp.int32(-3))
    with pytest.raises(checkify.JaxRuntimeError, match="state.count must be >= 0, got -3"):
        error.throw()
    error, updates = checked(0.5, jnp.int32(0))
    assert error.get() is None
    np.testing.assert_allclose(updates, -0.1, rtol=1e-6)  # the first step: -lr * sign(g)
    with pytest.raises(ValueError, match=r"adamx.check_hyperparams: b1 must be in \[0, 1\), got 2"):
        adamx.check_hyperparams(b1=2)  # concrete values raise at once


def test_inject_hyperparams_of_amsgrad_steps_under_jit_without_params():
    # amsgrad's weight_decay defaults to None, which inject_hyperparams leaves static; a 0.0 default
    # became a tracer there that could not be told from a decay needing the params
    tx = optax.inject_hyperparams(adamx.amsgrad)(learning_rate=0.1)
    params = {"w": jnp.ones(3)}
    updates, _ = jax.jit(tx.update)(params, tx.init(params))
    want, _ = adamx.amsgrad(0.1).update(params, adamx.amsgrad(0.1).init(params))
    np.testing.assert_array_equal(updates["w"], want["w"])
    decayed = optax.inject_hyperparams(adamx.amsgrad)(learning_rate=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="adamx.amsgrad: weight decay needs the params"):
        jax.jit(decayed.update)(params, decayed.init(params))


@pytest.mark.parametrize("bits, error, message", [
    (jnp.zeros(3, jnp.uint32), ValueError, r"random_bits must have x's shape \(4,\), got \(3,\)"),
    (jnp.zeros(5, jnp.uint32), ValueError, r"random_bits must have x's shape \(4,\), got \(5,\)"),
    (jnp.zeros(4, jnp.int32), TypeError, "random_bits must be uint32, got int32"),
])
def test_quantize_refuses_random_bits_that_do_not_fit(bits, error, message):
    with pytest.raises(error, match="adamx.quantize: " + message):
        adamx.quantize(jnp.ones(4), random_bits=bits)


def _swapped_moments():
    params = {"w": jnp.ones((64, 128))}
    state = adamx.init(params, mu_dtype="int8", nu_dtype="int8")
    return adamx.update, (params, state.replace(mu=state.nu, nu=state.mu)), {"learning_rate": 0.1}


def _abstract_state():
    params = {"w": jnp.ones(3)}
    return adamx.adam(0.1).update, (params, jax.eval_shape(adamx.adam(0.1).init, params)), {}


# Bad input the fuzz pass found reaching raw errors (or none): each names the function and argument.
@pytest.mark.parametrize("call, error, message", [
    (_swapped_moments, ValueError, r"adamx.update: state.mu\['w'\] is an Int8Blocks of unsigned "
                                   r"codes, but a first moment needs signed ones"),
    (_abstract_state, TypeError, r"adamx.adam: state.count must be an array, got ShapeDtypeStruct "
                                 r"\(an abstract state"),
    (lambda: (adamx.check_hyperparams, (), {"count": 1.5}), TypeError,
     "adamx.check_hyperparams: count must be an integer, got 1.5"),
    (lambda: (adamx.check_hyperparams, (), {"count": True}), TypeError,
     "adamx.check_hyperparams: count must be an integer, got True"),
    (lambda: (adamx.check_hyperparams, (), {"count": 2**40}), ValueError,
     r"adamx.check_hyperparams: count must be in \[0, 2\*\*31\), got 1099511627776"),
    (lambda: (adamx.check_hyperparams, (), {"count": jnp.zeros(2, jnp.int32)}), TypeError,
     "adamx.check_hyperparams: count must be an integer scalar"),
    (lambda: (adamx.zero1_shardings, (adamx.init({"w": jnp.ones(4)}), "mesh"), {}), TypeError,
     "adamx.zero1_shardings: mesh must be a jax.sharding.Mesh, got str"),
    (lambda: (adamx.zero1_shardings, ({"w": 3.0}, jax.make_mesh((1,), ("data",))), {}), TypeError,
     r"adamx.zero1_shardings: state\['w'\] must be an array or a jax.ShapeDtypeStruct, got float"),
    (lambda: (adamx.adam, (0.1,), {"mu_dtype": {"w": "int8"}}), ValueError,
     "adamx.adam: mu_dtype must be one of .*, got dict"),
    (lambda: (adamx.init, ({"w": jnp.ones(3)},), {"nu_dtype": jnp.zeros(3)}), ValueError,
     r"adamx.init: nu_dtype must be one of .*, got float32\[3\]"),
    (lambda: (adamx.init, ({"a": "x"},), {}), TypeError,
     r"adamx.init: params\['a'\] must be an array \(or a jax.ShapeDtypeStruct\), got str"),
    (lambda: (adamx.adam(0.1).init, ({"a": object()},), {}), TypeError,
     r"adamx.adam: params\['a'\] must be an array .*, got object"),
    (lambda: (adamx.quantize, (None,), {}), TypeError,
     "adamx.quantize: x must be a real float array, got NoneType"),
    (lambda: (adamx.quantize, ([[1.0], [1.0, 2.0]],), {}), TypeError,
     "adamx.quantize: x must be a real float array, got list"),
    (lambda: (adamx.dequantize, (adamx.quantize(jnp.ones(3)), "int77"), {}), TypeError,
     "adamx.dequantize: dtype must be a real float dtype, got 'int77'"),
    (lambda: (adamx.dequantize, (adamx.Int8Blocks(jnp.ones(3), jnp.ones(1)),), {}), ValueError,
     "adamx.dequantize: q.codes of an Int8Blocks must be int8 or uint8, got float32"),
    (lambda: (adamx.dequantize, (adamx.Int8Blocks(jnp.ones(300, jnp.int8), jnp.ones((5, 5))),), {}),
     ValueError, r"adamx.dequantize: q.absmax has shape \(5, 5\)"),
    (lambda: (adamx.dequantize, (adamx.Int4Rank1(jnp.ones((4, 2), jnp.uint8), jnp.ones(3),
                                                 jnp.ones(4)),), {}),
     ValueError, r"adamx.dequantize: q.codes has shape \(4, 2\), but a grads' leaf of shape \(3, 4\) "
                 r"needs \(3, 2\)"),
    (lambda: (adamx.adam, (10**400,), {}), ValueError,
     "adamx.adam: learning_rate must be finite and >= 0, got 1000"),
    (lambda: (adamx.adam, (0.1,), {"seed": 10**400}), ValueError,
     r"adamx.adam: seed must be in \[0, 2\*\*32\), got 1000"),
    (lambda: (adamx.update, (jnp.ones(2), adamx.init(jnp.ones(2))),
              {"learning_rate": 0.1, "b2": jax.ShapeDtypeStruct((), jnp.float32)}), TypeError,
     r"adamx.update: b2 must be a real scalar, got ShapeDtypeStruct"),
    (lambda: (adamx.adamw(0.1).update, ({"w": jnp.ones(2), "b": jnp.ones(2)},
                                        adamx.init({"w": jnp.ones(2), "b": jnp.ones(2)}),
                                        {"w": jnp.ones(2), "b": None}), {}), ValueError,
     r"adamx.adamw: params\['b'\] is None where the grads have float32\[2\]"),
    (lambda: (jax.eval_shape, (adamx.adam(0.1, mu_dtype="int8").init,
                               jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 3"), jnp.float32)),
              {}), TypeError, r"adamx: 8- and 4-bit moments need leaves of static shape, got \(b, 3\)"),
    (lambda: (adamx.from_optax, (optax.ScaleByAdamState(jnp.int32(1), [1.0], [1.0]),), {}),
     TypeError, "adamx.from_optax: the optax state's mu must hold arrays, got float"),
])
def test_bad_input_names_the_function_and_the_argument(call, error, message):
    fn, args, kwargs = call()
    with pytest.raises(error, match=message):
        fn(*args, **kwargs)
