"""The native kernel (``adamx._native``) computes what the plain JAX path computes.

The oracle is the plain path (``adamx.update`` then ``optax.apply_updates``), itself checked
against the float64 reference elsewhere; one test here also checks the kernel against
``tests/reference.py`` directly, and the ABI tests read the step scalars by name from a float64
NumPy transcription of ``abi.h``. These tests call ``_native.step`` directly, as
``adamx.apply(..., fused=True)`` does; they fail, not skip, when the kernel is not built.
"""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _native, _numerics
from tests.helpers import grad_sequence, nested_params
from tests.reference import ReferenceAdam

STEPS = 20
# Float32 rounding: XLA contracts multiply-adds into FMAs where the kernel rounds twice, so
# values differ by an ulp here and there, and a param keeps the absolute error of the larger
# values it had on its way; so the tolerance is a few ulp of each leaf's scale.
RTOL, ULPS = 2e-6, 8
FLAG_SETS = list(itertools.product([False, True], repeat=3))  # maximize, eps_hat, nesterov


def _ext():
    ok, why = _native.status()
    assert ok, why
    return _native._import_ext()


def kernel_scalars(count, *, learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
                   weight_decay=0.0):
    """The step scalars of abi.h for the step that makes the count ``count``.

    The bias corrections are the plain path's own float32 values (``adamx._numerics``), so that
    the comparison tests the kernel, not two ways of computing 1 - b**t.
    """
    f32 = jnp.float32
    count = jnp.asarray(count, jnp.int32)
    omb1, omb2 = _numerics.one_minus(b1), _numerics.one_minus(b2)
    bc1 = _numerics.bias_correction(omb1, count, f32)
    bc2 = _numerics.bias_correction(omb2, count, f32)
    bc1_next = _numerics.bias_correction(omb1, count + 1, f32)
    one = jnp.ones([], f32)
    s = {
        "scale": -jnp.asarray(learning_rate, f32), "b1": b1, "omb1": omb1, "b2": b2,
        "omb2": omb2, "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay,
        "inv_bc1": one / bc1, "inv_bc2": one / bc2, "step_scale": jnp.sqrt(bc2),
        "nesterov_m": jnp.asarray(b1, f32) / bc1_next, "nesterov_g": jnp.asarray(omb1, f32) / bc1,
    }
    return {k: jnp.asarray(v, f32) for k, v in s.items()}


HYPER = ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay")


def _decay_flags(params, options):
    leaves = jax.tree.leaves(params)
    if not options.get("weight_decay", 0.0):
        return [False] * len(leaves)
    mask = options.get("mask")
    if mask is None:
        return [True] * len(leaves)
    return [bool(m) for m in jax.tree.leaves(mask(params))]


def native_step(options, donate=True):
    """``adamx.apply(..., fused=True)`` written with ``_native.step``: a jitted
    ``(params, state, grads, hyper) -> (params, state)``, with the hyperparameters traced."""
    flags = {k: options.get(k, False) for k in ("maximize", "eps_hat", "nesterov")}

    def step(params, state, grads, hyper):
        p, treedef = jax.tree.flatten(params)
        g = treedef.flatten_up_to(grads)
        mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        lr = options["learning_rate"]
        lr = lr(state.count) if callable(lr) else hyper["learning_rate"]
        count = state.count + 1
        s = kernel_scalars(count, **{**hyper, "learning_rate": lr})
        decay = _decay_flags(params, options)
        live = [k for k in range(len(p)) if p[k].size]
        out = _native.step(s, [(p[k], g[k], mu[k], nu[k]) for k in live],
                           [decay[k] for k in live], **flags)
        for k, (new_p, new_mu, new_nu) in zip(live, out):
            p[k], mu[k], nu[k] = new_p, new_mu, new_nu
        return treedef.unflatten(p), state.replace(count=count, mu=treedef.unflatten(mu),
                                                   nu=treedef.unflatten(nu))

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def plain_step(options):
    """The oracle: ``adamx.update`` and ``optax.apply_updates``, with the hyperparameters traced."""
    static = {k: v for k, v in options.items() if k not in HYPER}

    def step(params, state, grads, hyper):
        lr = options["learning_rate"]
        hyper = {**hyper, "learning_rate": lr if callable(lr) else hyper["learning_rate"]}
        updates, state = adamx.update(grads, state, params, **hyper, **static)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def _hyper(options):
    """The traced hyperparameters of ``options`` (a schedule stays static)."""
    defaults = dict(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
                    weight_decay=0.0)
    hyper = {k: options.get(k, v) for k, v in defaults.items()}
    if callable(hyper["learning_rate"]):
        hyper["learning_rate"] = 0.0
    return {k: jnp.float32(v) for k, v in hyper.items()}


def _run(step, params, grads_seq, options):
    state = adamx.init(params)
    params = jax.tree.map(jnp.copy, params)
    hyper = _hyper(options)
    for grads in grads_seq:
        params, state = step(params, state, grads, hyper)
    return params, state.mu, state.nu


def _wide_params():
    """Leaves spanning the kernel's work chunks (65,536 elements and up run threaded): a 0-d
    leaf, an empty one, and one of several chunks."""
    rng = np.random.default_rng(3)
    sizes = [1, 7, 256, 8192, 300_013]
    tree = {f"v{n}": jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes}
    tree["scalar"] = jnp.float32(0.5)
    tree["empty"] = jnp.zeros((0, 3), jnp.float32)
    tree["matrix"] = jnp.asarray(rng.normal(size=(33, 17)), jnp.float32)
    return tree


def _assert_trees_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        e = np.asarray(e)
        scale = float(np.max(np.abs(e), initial=1.0))
        atol = ULPS * float(np.finfo(np.float32).eps) * scale
        np.testing.assert_allclose(np.asarray(a), e, rtol=RTOL, atol=atol)


def test_native_kernel_is_built_and_registered():
    # CI installs adamx with a compiler: a missing or broken build fails here, with the reason.
    assert _native.status() == (True, "")


def test_importing_adamx_loads_no_native_code():
    code = ("import sys, adamx, jax.numpy as jnp; adamx.adam(1e-3); "
            "assert 'adamx._native._ext' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_abi_is_one_list_read_from_the_header_and_the_module():
    ext = _ext()
    scalars, flags = _native.header_abi()
    assert tuple(ext.SCALARS) == scalars == _native.SCALARS
    assert dict(ext.FLAGS) == flags
    assert ext.TARGET == "adamx_adam_step_f32"
    # The flags are step()'s keyword options, each its own bit.
    assert set(flags) == {"maximize", "eps_hat", "nesterov"}
    assert sorted(flags.values()) == [1 << i for i in range(len(flags))]
    assert set(scalars) == set(kernel_scalars(1, learning_rate=0.1))


def test_a_stale_build_or_a_missing_one_is_refused_with_the_reason(monkeypatch):
    scalars, flags = _native.header_abi()
    swapped = (scalars[1], scalars[0]) + scalars[2:]
    monkeypatch.setattr(_native, "header_abi", lambda: (swapped, flags))
    ext, why = _native._load.__wrapped__()
    assert ext is None and "another version of abi.h" in why
    monkeypatch.undo()

    def not_built():
        raise ModuleNotFoundError("No module named 'adamx._native._ext'")

    monkeypatch.setattr(_native, "_import_ext", not_built)
    ext, why = _native._load.__wrapped__()
    assert ext is None and "installed without its native kernel" in why
    assert "--no-build-isolation" in why
    monkeypatch.setattr(_native, "_load", _native._load.__wrapped__)
    assert _native.status() == (False, why)
    with pytest.raises(RuntimeError, match="installed without its native kernel"):
        _native.step({}, [], [], maximize=False, eps_hat=False, nesterov=False)
    # Without the module, the names come from abi.h.
    assert _native.__getattr__("SCALARS") == scalars


def test_a_registration_that_jaxlib_refuses_is_reported_with_both_versions(monkeypatch):
    import jaxlib

    def refuse(*args, **kwargs):
        raise RuntimeError("the handler's API version (0.9) is incompatible")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    ext, why = _native._load.__wrapped__()
    assert ext is None and "API version (0.9) is incompatible" in why
    assert f"jaxlib {jaxlib.__version__} is installed" in why and "--no-build-isolation" in why


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
    "traced_hyperparameters": dict(learning_rate=5e-3, b1=0.8, b2=0.95, eps=1e-6),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_kernel_matches_plain_path_over_20_steps(name):
    options = OPTIONS[name]
    params = _wide_params() if name in ("adamw_masked", "nesterov", "eps_hat") else nested_params()
    grads_seq = grad_sequence(params, STEPS)
    expected = _run(plain_step(options), params, grads_seq, options)
    actual = _run(native_step(options), params, grads_seq, options)
    _assert_trees_close(actual, expected)


def test_kernel_matches_float64_reference():
    params = _wide_params()
    grads_seq = grad_sequence(params, STEPS)
    leaves = jax.tree.leaves(params)
    ref = ReferenceAdam([(x.shape, False) for x in leaves], lr=1e-2, weight_decay=0.05)
    expected = [np.asarray(x, np.float64) for x in leaves]
    for grads in grads_seq:
        deltas = ref.step([np.asarray(g) for g in jax.tree.leaves(grads)], expected)
        expected = [p + u for p, u in zip(expected, deltas)]
    options = dict(learning_rate=1e-2, weight_decay=0.05)
    actual, _, _ = _run(native_step(options), params, grads_seq, options)
    for a, e in zip(jax.tree.leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("maximize, eps_hat, nesterov", FLAG_SETS)
def test_each_flag_and_scalar_means_what_the_plain_path_means(maximize, eps_hat, nesterov):
    # Every hyperparameter distinct and large enough to matter (eps and eps_root against v), so
    # a scalar read from a neighbour's position, or a flag read from another bit, shows.
    options = dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-3, eps_root=1e-4,
                   weight_decay=0.03, maximize=maximize, eps_hat=eps_hat, nesterov=nesterov,
                   mask=lambda p: {"w": True, "b": False})
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    grads_seq = grad_sequence(params, 3, scale=0.03)
    expected = _run(plain_step(options), params, grads_seq, options)
    actual = _run(native_step(options), params, grads_seq, options)
    _assert_trees_close(actual, expected)


def _abi_h_step(s, p, g, m, v, *, maximize, eps_hat, nesterov, decay):
    """abi.h's per-element step in float64, reading every scalar by name."""
    s = {k: float(x) for k, x in s.items()}
    p, g, m, v = (np.asarray(x, np.float64) for x in (p, g, m, v))
    g = -g if maximize else g
    m = s["omb1"] * g + s["b1"] * m
    v = s["omb2"] * g * g + s["b2"] * v
    m_hat = s["nesterov_m"] * m + s["nesterov_g"] * g if nesterov else m * s["inv_bc1"]
    if eps_hat:
        d = m_hat * (s["step_scale"] / (np.sqrt(v + s["eps_root"]) + s["eps"]))
    else:
        d = m_hat / (np.sqrt(v * s["inv_bc2"] + s["eps_root"]) + s["eps"])
    if decay:
        d = d + s["weight_decay"] * p
    return p + s["scale"] * d, m, v


@pytest.mark.parametrize("name", _native.header_abi()[0])
def test_each_scalar_enters_the_kernel_where_abi_h_says(name):
    rng = np.random.default_rng(1)
    n = 1000
    p, m = (rng.normal(size=n).astype(np.float32) for _ in range(2))
    g = (0.03 * rng.normal(size=n)).astype(np.float32)
    v = (1e-3 * rng.random(n)).astype(np.float32)
    # Distinct values, so that any two scalars read in each other's place change the result.
    base = dict(zip(_native.header_abi()[0], np.linspace(0.11, 0.97, 13)))
    base.update(scale=-0.05, eps=1e-3, eps_root=2e-4)
    used = False
    for eps_hat, nesterov in ((False, False), (True, True)):
        flags = dict(maximize=False, eps_hat=eps_hat, nesterov=nesterov)
        outs = []
        for factor in (1.0, 1.5):
            s = {k: jnp.float32(x * factor if k == name else x) for k, x in base.items()}
            out = _native.step(s, [(p, g, m, v)], [True], **flags)[0]
            expected = _abi_h_step(s, p, g, m, v, decay=True, **flags)
            for a, e in zip(out, expected):
                np.testing.assert_allclose(np.asarray(a), e, rtol=2e-5, atol=1e-7)
            outs.append(np.asarray(out[0]))
        used |= not np.array_equal(outs[0], outs[1])
    assert used, f"the kernel's result does not depend on {name}"


def test_donated_step_is_one_custom_call_in_place():
    # An empty leaf is a constant that XLA copies (zero bytes), so leave it out here.
    params = {k: v for k, v in _wide_params().items() if v.size}
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    hlo = native_step(options).lower(params, adamx.init(params), params,
                                     _hyper(options)).compile().as_text()
    assert hlo.count("custom-call(") == 1
    # No buffer is copied (the step count, a scalar, may be).
    assert [line for line in hlo.splitlines() if " copy(" in line and "[] copy(" not in line] == []


def test_without_donation_the_inputs_are_untouched():
    params = _wide_params()
    grads = grad_sequence(params, 1)[0]
    state = adamx.init(params)
    before = jax.tree.map(np.array, (params, state))
    options = dict(learning_rate=1e-2)
    new_params, _ = native_step(options, donate=False)(params, state, grads, _hyper(options))
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree.leaves(new_params), jax.tree.leaves(before[0])) if b.size]
    assert all(moved)


def test_many_leaves_make_several_custom_calls(monkeypatch):
    monkeypatch.setattr(_native, "GROUP", 3)
    params = _wide_params()  # 7 non-empty leaves: calls of 3, 3 and 1
    grads_seq = grad_sequence(params, 5)
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    step = native_step(options)
    hlo = step.lower(params, adamx.init(params), params, _hyper(options)).compile().as_text()
    assert hlo.count("custom-call(") == 3
    expected = _run(plain_step(options), params, grads_seq, options)
    _assert_trees_close(_run(step, params, grads_seq, options), expected)


def _bit_test_data(n, seed=0):
    """Float32 operands over many magnitudes, with zeros and negative zeros, no subnormals."""
    rng = np.random.default_rng(seed)

    def spread(low, high):
        x = rng.normal(size=n) * 10.0 ** rng.uniform(low, high, size=n)
        x[rng.random(n) < 0.05] = 0.0
        x[rng.random(n) < 0.02] = -0.0
        return x.astype(np.float32)

    p, g, m = spread(-3, 2), spread(-3, 2), spread(-3, 1)
    v = np.abs(spread(-6, 2))
    scalars = kernel_scalars(7, learning_rate=1e-2, b1=0.85, b2=0.98, eps=1e-7, eps_root=1e-9,
                             weight_decay=0.02)
    return np.asarray([scalars[k] for k in _native.SCALARS], np.float32), p, g, m, v


def _run_isa(ext, isa, s, p, g, m, v, flags, decay):
    p, m, v = p.copy(), m.copy(), v.copy()
    ext.run_isa(isa, s, p, g, m, v, flags, decay)
    return p, m, v


def test_every_instruction_set_variant_gives_the_same_bits():
    ext = _ext()
    assert ext.SUPPORTED_ISAS[0] == "baseline" and ext.DISPATCHED_ISA == ext.SUPPORTED_ISAS[-1]
    s, p, g, m, v = _bit_test_data(4099)  # not a multiple of any vector width
    for flags, decay in itertools.product(range(8), (False, True)):
        expected = _run_isa(ext, "baseline", s, p, g, m, v, flags, decay)
        for isa in ext.SUPPORTED_ISAS[1:]:
            actual = _run_isa(ext, isa, s, p, g, m, v, flags, decay)
            for a, e in zip(actual, expected):
                np.testing.assert_array_equal(a.view(np.int32), e.view(np.int32),
                                              err_msg=f"{isa}, flags {flags}, decay {decay}")


def test_custom_call_gives_the_bits_of_one_thread_in_one_pass():
    # The threaded custom call splits the elements into chunks; no split changes a bit.
    ext = _ext()
    s, p, g, m, v = _bit_test_data(300_013, seed=1)
    scalars = dict(zip(_native.SCALARS, (jnp.float32(x) for x in s)))
    for flags in FLAG_SETS:
        options = dict(zip(("maximize", "eps_hat", "nesterov"), flags))
        bits = sum(ext.FLAGS[k] for k, on in options.items() if on)
        expected = _run_isa(ext, ext.DISPATCHED_ISA, s, p, g, m, v, bits, True)
        actual = jax.jit(lambda s, p, g, m, v, o=options: _native.step(
            s, [(p, g, m, v)], [True], **o))(scalars, p, g, m, v)[0]
        for a, e in zip(actual, expected):
            np.testing.assert_array_equal(np.asarray(a).view(np.int32), e.view(np.int32))


def test_step_rejects_bad_arguments():
    s = kernel_scalars(1, learning_rate=0.1)
    x = jnp.ones(3)
    leaf = [(x, x, x, x)]
    flags = dict(maximize=False, eps_hat=False, nesterov=False)
    extra = {**{k: v for k, v in s.items() if k != "b1"}, "bc1": s["b1"]}
    with pytest.raises(ValueError, match=r"missing \['b1'\], extra \['bc1'\]"):
        _native.step(extra, leaf, [False], **flags)
    with pytest.raises(ValueError, match="scalars\\['eps'\\] must be a float32 0-d array"):
        _native.step({**s, "eps": jnp.ones(2)}, leaf, [False], **flags)
    with pytest.raises(ValueError, match=r"leaves\[0\] \(p, g, m, v\) must be float32"):
        _native.step(s, [(x, x, x.astype(jnp.bfloat16), x)], [False], **flags)
    with pytest.raises(ValueError, match="one shape"):
        _native.step(s, [(x, x, jnp.ones(4), x)], [False], **flags)
    with pytest.raises(ValueError, match="empty"):
        e = jnp.ones(0)
        _native.step(s, [(e, e, e, e)], [False], **flags)
    with pytest.raises(ValueError, match="one entry per leaf"):
        _native.step(s, leaf, [], **flags)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        _native.step(s, leaf, [False], maximize=False, eps_hat=False, nesterov=1)
