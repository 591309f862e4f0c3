"""The CPU kernels compute what the plain JAX path computes, and everything falls back safely.

Two kernels: ``adam_step`` behind ``adamx.apply`` (the whole step, params updated in place), and
``adam_moments`` behind the Optax protocol (``adamx.update`` and the factories) on CPU. The oracle
is the plain JAX path (``adamx.update`` then ``optax.apply_updates``, traced with the kernels
switched off), itself checked against the float64 reference elsewhere; one test here also checks
``apply`` against ``tests/reference.py`` directly. Derivatives and vmap of the Optax protocol go
through the plain path and are checked against it.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _fused, _kernel
from adamx._state import init
from adamx._update import update
from tests.helpers import grad_sequence, nested_params
from tests.reference import ReferenceAdam

STEPS = 20
# Float32 rounding: the two paths contract different multiply-adds into FMAs, so values differ by
# an ulp here and there, and a param keeps the absolute error of the larger values it had on its
# way; so the tolerance is a few ulp of each leaf's scale.
RTOL, ULPS = 2e-6, 8

needs_kernel = pytest.mark.skipif(
    not _kernel.kernel_available(), reason=f"CPU kernel unavailable: {_kernel._kernel_status()[1]}"
)


def plain_path(fn):
    """``fn`` traced with the CPU kernels switched off (the plain JAX path, as on GPU and TPU)."""
    def traced(*args):
        with _kernel.switched_off():
            return fn(*args)

    return traced


def _plain_step(options):
    """The oracle: adamx.update and optax.apply_updates on the plain JAX path."""
    def step(params, state, grads):
        updates, state = update(grads, state, params, **options)
        return optax.apply_updates(params, updates), state

    return jax.jit(plain_path(step))


def _optax_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    jitted.__wrapped__ = step
    return jitted


def _fused_step(options, fused=None):
    def step(params, state, grads):
        return _fused.apply(grads, state, params, fused=fused, **options)

    return jax.jit(step, donate_argnums=(0, 1))


def _wide_params():
    """Leaves spanning the kernel's work chunks: a 0-d leaf, an empty one, one of 5 chunks."""
    rng = np.random.default_rng(3)
    sizes = [1, 7, 256, 8192, 5 * _kernel.CHUNK + 13]
    tree = {f"v{n}": jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes}
    tree["scalar"] = jnp.float32(0.5)
    tree["empty"] = jnp.zeros((0, 3), jnp.float32)
    tree["matrix"] = jnp.asarray(rng.normal(size=(33, 17)), jnp.float32)
    return tree


def _run(step, params, grads_seq, state=None):
    state = init(params) if state is None else state
    params = jax.tree.map(jnp.copy, params)
    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state


def _assert_trees_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        e = np.asarray(e)
        scale = float(np.max(np.abs(e), initial=1.0))
        atol = ULPS * float(np.finfo(np.float32).eps) * scale
        np.testing.assert_allclose(np.asarray(a), e, rtol=RTOL, atol=atol)


OPTIONS = {
    "adam": dict(learning_rate=1e-2),
    "adamw": dict(learning_rate=1e-2, weight_decay=0.05),
    "adamw_masked": dict(learning_rate=3e-3, weight_decay=0.1,
                         mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "eps_root_b1_zero": dict(learning_rate=1e-2, b1=0.0, b2=0.99, eps_root=1e-6),
    "eps_hat": dict(learning_rate=1e-2, eps_hat=True, eps=1e-7),
    "maximize": dict(learning_rate=1e-2, maximize=True),
    "nesterov": dict(learning_rate=1e-2, nesterov=True, weight_decay=0.01),
    "schedule": dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 10)),
    "traced_lr_array": dict(learning_rate=jnp.float32(5e-3), b2=jnp.float32(0.95)),
}


@needs_kernel
@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_matches_plain_path_over_20_steps(name):
    params = _wide_params() if name in ("adamw_masked", "nesterov", "eps_hat") else nested_params()
    grads_seq = grad_sequence(params, STEPS)
    expected = _run(_plain_step(OPTIONS[name]), params, grads_seq)
    actual = _run(_fused_step(OPTIONS[name], fused=True), params, grads_seq)
    _assert_trees_close(actual, expected)


def _bits(x):
    return np.asarray(x).view(np.int32)


def _max_ulps(a, e):
    """The largest distance in float32 ulps between two arrays (same signs assumed near zero)."""
    return int(np.max(np.abs(_bits(a).astype(np.int64) - _bits(e).astype(np.int64)), initial=0))


OPTAX_PROTOCOL = {
    "adam": lambda: adamx.adam(1e-2),
    "adamw_masked": lambda: adamx.adamw(3e-3, weight_decay=0.1,
                                        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "nesterov_eps_hat": lambda: adamx.adam(1e-2, nesterov=True, eps_hat=True, eps=1e-7),
    "amsgrad": lambda: adamx.amsgrad(1e-2),
    "schedule_eps_root": lambda: adamx.adam(optax.linear_schedule(1e-2, 1e-3, 10),
                                            b1=0.0, b2=0.99, eps_root=1e-6),
    "inject_hyperparams": lambda: optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2,
                                                                       b1=0.8, b2=0.95),
}


@needs_kernel
@pytest.mark.parametrize("name", list(OPTAX_PROTOCOL))
def test_optax_protocol_kernel_matches_plain_path_to_the_ulp(name):
    params = _wide_params()
    params["bf16"] = jnp.linspace(-1, 1, 300, dtype=jnp.bfloat16)  # a leaf the kernel skips
    grads_seq = grad_sequence(params, STEPS)
    tx = OPTAX_PROTOCOL[name]()
    step = _optax_step(tx)
    assert "custom-call(" in step.lower(params, tx.init(params), params).compile().as_text()
    actual = _run(step, params, grads_seq, tx.init(params))
    plain = jax.jit(plain_path(_optax_step(tx).__wrapped__))
    assert "custom-call(" not in plain.lower(params, tx.init(params), params).compile().as_text()
    expected = _run(plain, params, grads_seq, tx.init(params))
    # The same float32 expressions; GCC and XLA's LLVM may contract a multiply-add differently
    # (measured: bit for bit with constant hyperparameters, 1 ulp with traced ones), and a
    # param keeps what its update rounded differently.
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if a.dtype == jnp.float32 and a.ndim:
            assert _max_ulps(a, e) <= ULPS
        else:
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                       rtol=RTOL)


@needs_kernel
def test_optax_protocol_step_is_one_fusion_per_leaf_in_place():
    params = {k: v for k, v in _wide_params().items() if v.size}
    tx = adamx.adam(1e-2)
    hlo = _optax_step(tx).lower(params, tx.init(params), params).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert entry.count("custom-call(") == 1
    big = [line for line in entry.splitlines() if " fusion(" in line and "f32[]" not in line
           and "s32[]" not in line]
    assert len(big) == len([x for x in jax.tree.leaves(params) if x.ndim])  # p + u per leaf
    assert " copy(" not in entry.replace("s32[] copy(", "")  # moments updated in place


@needs_kernel
def test_optax_protocol_kernel_steps_aside_for_maximize_adamax_and_several_devices(monkeypatch):
    params = nested_params()
    for tx in (adamx.adam(1e-2, maximize=True), adamx.adamax(1e-2)):
        assert "custom-call(" not in _optax_step(tx).lower(
            params, tx.init(params), params).compile().as_text()
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)
    tx = adamx.adam(1e-2)
    assert "custom-call(" not in _optax_step(tx).lower(
        params, tx.init(params), params).compile().as_text()


@needs_kernel
def test_optax_protocol_differentiates_and_vectorizes_through_the_plain_path():
    params = {k: v for k, v in _wide_params().items() if v.size}
    grads_seq = grad_sequence(params, 3)

    def loss_after_steps(lr):
        tx = adamx.adam(lr)
        p, state = params, tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))

    lr = jnp.float32(1e-2)
    with_kernel = jax.jit(jax.value_and_grad(loss_after_steps))(lr)
    plain = jax.jit(plain_path(jax.value_and_grad(loss_after_steps)))(lr)
    np.testing.assert_allclose(with_kernel, plain, rtol=1e-6)
    assert np.isfinite(with_kernel[1]) and with_kernel[1] != 0

    tx = adamx.scale_by_adam()
    state = tx.init(params)
    batch = jax.tree.map(lambda g: jnp.stack([g, -2 * g, g * g]), grads_seq[0])
    batched = jax.jit(jax.vmap(lambda g: tx.update(g, state, params)))(batch)
    plain = jax.jit(plain_path(lambda g: tx.update(g, state, params)))
    for i in range(3):
        one = plain(jax.tree.map(lambda x, i=i: x[i], batch))
        for a, e in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            assert _max_ulps(np.asarray(a)[i], e) <= ULPS


@needs_kernel
def test_apply_keeps_the_plain_path_when_several_devices_are_present(monkeypatch):
    params = nested_params()
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)
    hlo = _fused_step(OPTIONS["adam"]).lower(params, init(params), params).compile().as_text()
    assert "custom-call(" not in hlo
    with pytest.raises(RuntimeError, match="2 devices: the kernel has no sharding rule"):
        _fused.apply(params, init(params), params, learning_rate=1e-2, fused=True)


@needs_kernel
def test_fused_kernel_matches_float64_reference():
    params = _wide_params()
    grads_seq = grad_sequence(params, STEPS)
    leaves = jax.tree.leaves(params)
    ref = ReferenceAdam([(x.shape, False) for x in leaves], lr=1e-2, weight_decay=0.05)
    expected = [np.asarray(x, np.float64) for x in leaves]
    for grads in grads_seq:
        deltas = ref.step([np.asarray(g) for g in jax.tree.leaves(grads)], expected)
        expected = [p + u for p, u in zip(expected, deltas)]
    actual, _ = _run(_fused_step(dict(learning_rate=1e-2, weight_decay=0.05), fused=True),
                     params, grads_seq)
    for a, e in zip(jax.tree.leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fused_step_is_one_custom_call_in_place_when_donated():
    # An empty leaf is a constant that XLA copies (zero bytes), so leave it out here.
    params = {k: v for k, v in _wide_params().items() if v.size}
    state = init(params)
    hlo = _fused_step(dict(learning_rate=1e-2)).lower(params, state, params).compile().as_text()
    assert hlo.count("custom-call(") == 1
    assert " copy(" not in hlo


@needs_kernel
def test_fused_step_without_donation_leaves_inputs_unchanged():
    params = _wide_params()
    grads = grad_sequence(params, 1)[0]
    state = init(params)
    before = jax.tree.map(np.array, (params, state))
    step = jax.jit(lambda p, s, g: _fused.apply(g, s, p, learning_rate=1e-2, fused=True))
    new_params, _ = step(params, state, grads)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree.leaves(new_params), jax.tree.leaves(before[0])) if b.size]
    assert all(moved)


@needs_kernel
def test_fused_step_with_donation_consumes_inputs_and_matches_plain():
    params = _wide_params()
    grads = grad_sequence(params, 1)[0]
    expected = _plain_step(dict(learning_rate=1e-2))(params, init(params), grads)
    donated = jax.tree.map(jnp.copy, params)
    state = init(params)
    actual = _fused_step(dict(learning_rate=1e-2), fused=True)(donated, state, grads)
    assert all(x.is_deleted() for x in jax.tree.leaves(donated) if x.size)
    _assert_trees_close(actual, expected)


def test_unsupported_leaves_fall_back_to_plain_path():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.float32)}
    grads_seq = grad_sequence(params, 5)
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    expected = _run(_plain_step(options), params, grads_seq)
    actual = _run(_fused_step(options), params, grads_seq)
    _assert_trees_close(actual, expected)
    with pytest.raises(RuntimeError, match="float32"):
        _fused.apply(grads_seq[0], init(params), params, fused=True, **options)


def test_amsgrad_state_falls_back_to_plain_path():
    params = nested_params()
    grads = grad_sequence(params, 1)[0]
    state = init(params, amsgrad=True)
    expected = _plain_step(dict(learning_rate=1e-2))(params, state, grads)
    actual = _fused.apply(grads, state, params, learning_rate=1e-2)
    _assert_trees_close(actual, expected)


def test_unavailable_kernel_falls_back_to_plain_path(monkeypatch):
    monkeypatch.setattr(_kernel, "_kernel_status", lambda: (False, "no compiler (test)"))
    params = nested_params()
    grads_seq = grad_sequence(params, 5)
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    expected = _run(_plain_step(options), params, grads_seq)
    step = _fused_step(options)
    actual = _run(step, params, grads_seq)
    _assert_trees_close(actual, expected)
    hlo = step.lower(params, init(params), params).compile().as_text()
    assert "custom-call" not in hlo
    with pytest.raises(RuntimeError, match="no compiler"):
        _fused.apply(grads_seq[0], init(params), params, fused=True, **options)


def test_apply_checks_like_update():
    params = nested_params()
    state = init(params)
    with pytest.raises(ValueError, match="adamx.apply: b1 must be in"):
        _fused.apply(params, state, params, learning_rate=1e-2, b1=1.5)
    with pytest.raises(ValueError, match="adamx.apply: grads and state differ"):
        _fused.apply({"other": params["scale"]}, state, params, learning_rate=1e-2)
    with pytest.raises(TypeError, match="AdamState"):
        _fused.apply(params, (state,), params, learning_rate=1e-2)


@needs_kernel
def test_leaves_split_over_several_calls_match_plain_path(monkeypatch):
    monkeypatch.setattr(_kernel, "GROUP", 3)
    params = _wide_params()
    grads_seq = grad_sequence(params, 5)
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    expected = _run(_plain_step(options), params, grads_seq)
    step = _fused_step(options, fused=True)
    hlo = step.lower(params, init(params), params).compile().as_text()
    assert hlo.count("custom-call(") == 3
    _assert_trees_close(_run(step, params, grads_seq), expected)
