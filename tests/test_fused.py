"""``adamx.apply``: plain JAX by default; ``fused=True`` runs the native kernel, or raises why not.

The oracle is the plain path (``adamx.update`` then ``optax.apply_updates``), itself checked
against the float64 reference elsewhere; one test also checks ``apply(fused=True)`` against
``tests/reference.py`` directly. The kernel itself (ABI, instruction sets, grouping) is tested in
``tests/test_native.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _native
from tests.helpers import grad_sequence, nested_params
from tests.reference import ReferenceAdam
from tests.test_native import OPTIONS, STEPS, _assert_trees_close, _wide_params


def _plain_step(options):
    def step(params, state, grads):
        updates, state = adamx.update(grads, state, params, **options)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def _apply_step(options, donate=True, **fused):
    def step(params, state, grads):
        return adamx.apply(grads, state, params, **options, **fused)

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _run(step, params, grads_seq):
    state = adamx.init(params)
    params = jax.tree.map(jnp.copy, params)
    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state.mu, state.nu


def _hlo(step, params):
    return step.lower(params, adamx.init(params), params).compile().as_text()


def test_apply_is_plain_jax_by_default():
    params = _wide_params()
    grads_seq = grad_sequence(params, 3)
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    step = _apply_step(options)
    assert "custom-call" not in _hlo(step, params)
    for a, e in zip(jax.tree.leaves(_run(step, params, grads_seq)),
                    jax.tree.leaves(_run(_plain_step(options), params, grads_seq))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_kernel_available_says_whether_the_kernel_is_registered():
    assert adamx.kernel_available() is True
    assert _native.status() == (True, "")


@pytest.mark.parametrize("name", [k for k in OPTIONS if k != "traced_hyperparameters"])
def test_fused_apply_matches_plain_path_over_20_steps(name):
    options = OPTIONS[name]
    params = _wide_params() if name in ("adamw_masked", "nesterov", "eps_hat") else nested_params()
    grads_seq = grad_sequence(params, STEPS)
    expected = _run(_plain_step(options), params, grads_seq)
    actual = _run(_apply_step(options, fused=True), params, grads_seq)
    _assert_trees_close(actual, expected)


def test_fused_apply_with_traced_hyperparameters_matches_plain_path():
    params = nested_params()
    grads_seq = grad_sequence(params, STEPS)
    hyper = dict(learning_rate=jnp.float32(5e-3), b1=jnp.float32(0.8), b2=jnp.float32(0.95))

    def run(fused):
        @jax.jit
        def step(params, state, grads, hyper):
            return adamx.apply(grads, state, params, **hyper, fused=fused)

        state, p = adamx.init(params), params
        for grads in grads_seq:
            p, state = step(p, state, grads, hyper)
        return p, state.mu, state.nu

    _assert_trees_close(run(True), run(False))


def test_fused_apply_matches_float64_reference():
    params = _wide_params()
    grads_seq = grad_sequence(params, STEPS)
    leaves = jax.tree.leaves(params)
    ref = ReferenceAdam([(x.shape, False) for x in leaves], lr=1e-2, weight_decay=0.05)
    expected = [np.asarray(x, np.float64) for x in leaves]
    for grads in grads_seq:
        deltas = ref.step([np.asarray(g) for g in jax.tree.leaves(grads)], expected)
        expected = [p + u for p, u in zip(expected, deltas)]
    step = _apply_step(dict(learning_rate=1e-2, weight_decay=0.05), fused=True)
    actual, _, _ = _run(step, params, grads_seq)
    for a, e in zip(jax.tree.leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6)


def test_fused_apply_is_one_custom_call_in_place_when_donated():
    # An empty leaf is a constant that XLA copies (zero bytes), so leave it out here.
    params = {k: v for k, v in _wide_params().items() if v.size}
    hlo = _hlo(_apply_step(dict(learning_rate=1e-2), fused=True), params)
    assert hlo.count("custom-call(") == 1
    assert [line for line in hlo.splitlines() if " copy(" in line and "[] copy(" not in line] == []


def test_fused_apply_without_donation_leaves_inputs_unchanged():
    params = _wide_params()
    grads = grad_sequence(params, 1)[0]
    state = adamx.init(params)
    before = jax.tree.map(np.array, (params, state))
    new_params, _ = _apply_step(dict(learning_rate=1e-2), donate=False, fused=True)(
        params, state, grads)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert all(not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(new_params), jax.tree.leaves(before[0])) if b.size)


def _float32_case():
    params = nested_params()
    return params, adamx.init(params), params


def _bfloat16_case():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.float32)}
    return params, adamx.init(params), params


@pytest.mark.parametrize("case, options, match", [
    (_bfloat16_case, {}, "float32"),
    (_float32_case, dict(amsgrad=True), "AMSGrad"),
    (_float32_case, dict(param_rounding="stochastic"), "param_rounding"),
])
def test_fused_apply_refuses_what_the_kernel_does_not_compute(case, options, match):
    grads, _, params = case()
    state = adamx.init(params, amsgrad=options.get("amsgrad", False),
                       param_rounding=options.get("param_rounding", "nearest"))
    with pytest.raises(RuntimeError, match=f"adamx.apply: fused=True .*{match}"):
        adamx.apply(grads, state, params, learning_rate=1e-2, fused=True, **options)
    # The same step without fused runs the plain path.
    adamx.apply(grads, state, params, learning_rate=1e-2, **options)


def test_fused_apply_refuses_several_devices_another_backend_and_a_missing_build(monkeypatch):
    grads, state, params = _float32_case()

    def refused(match):
        with pytest.raises(RuntimeError, match=f"adamx.apply: fused=True .*{match}"):
            adamx.apply(grads, state, params, learning_rate=1e-2, fused=True)

    with monkeypatch.context() as m:
        m.setattr(jax, "device_count", lambda *a: 2)
        refused("2 devices")
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        refused("gpu")
    with monkeypatch.context() as m:
        m.setattr(_native, "status", lambda: (False, "no native kernel (test)"))
        refused(r"no native kernel \(test\)")


def test_apply_checks_like_update():
    params = nested_params()
    state = adamx.init(params)
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"adamx.apply: b1 must be in \[0, 1\), got 1.5"):
            adamx.apply(params, state, params, learning_rate=1e-2, b1=1.5, fused=fused)
