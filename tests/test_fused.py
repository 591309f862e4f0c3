"""``adamx.apply``: plain JAX by default; ``fused=True`` runs the native kernel, or raises why not.

The oracle is the plain path (``adamx.apply`` without ``fused``: ``adamx.update`` then
``optax.apply_updates``), itself checked against the float64 reference and the quantization
oracle elsewhere; one test also checks a float32 run against ``tests/reference.py`` directly.
The kernel itself (its ABI, instruction sets, threads) is tested in ``tests/test_native.py``.

The bounds the fused step keeps to the plain path, step by step from the same state (XLA
contracts some multiply-adds into FMAs, which the kernel rounds twice):

- float32 values (params, moments, the scales of quantized moments): within ``RTOL`` relative or
  ``ULPS`` float32 ulps of the largest magnitude of their leaf (a value near 0 keeps the error of
  the larger terms it came from); over 20 float32 steps, the same bound;
- bfloat16 values (params, moments, Kahan's compensation): within one bfloat16 ulp, or ``ULPS``
  float32 ulps of their leaf's (for the compensation, its param's) largest magnitude;
- quantized codes: a float32 ulp can carry a value across a stochastic-rounding threshold, so
  codes are equal except at most ``CODE_FLIPS`` of them, which differ by one code;
- where the first moment is stored in bfloat16 the step uses it as stored, and a float32 ulp (more, in
  relative terms, where ``b1 m`` and ``(1 - b1) g`` cancel) can round it to the neighbouring
  bfloat16: then that element's update moves by a bfloat16 ulp of itself. So in those modes the
  params and Kahan's compensation keep the bounds above except at most ``BF16_FLIPS`` of their
  elements, which exceed them by less than ``learning_rate / 16``.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adamx
from adamx import _native
from tests import helpers
from tests.helpers import grad_sequence, nested_params, wide_params
from tests.reference import ReferenceAdam

STEPS = 20
RTOL, ULPS = 2e-6, 8
BF16_RTOL = 2.0**-7  # one bfloat16 ulp, relative
CODE_FLIPS = 1e-3
BF16_FLIPS = 1e-2


def _trajectory(params, options, *, fused, steps=STEPS, state=None):
    """Params and moments after ``steps`` jitted steps of apply from ``adamx.init(params)``."""
    state = adamx.init(params) if state is None else state
    _, params, state = helpers.run(helpers.apply_step(fused=fused, **options), params, state,
                                   grad_sequence(params, steps))
    return params, state.mu, state.nu


def _hlo(step, params, state=None):
    state = adamx.init(params) if state is None else state
    return step.lower(params, state, params).compile().as_text()


def _apply_step(options, donate=True, **fused):
    return jax.jit(lambda params, state, grads: adamx.apply(grads, state, params, **options, **fused),
                   donate_argnums=(0, 1) if donate else ())


def _copies(hlo):
    """The lines of an HLO module that copy a buffer (the step count, a scalar, may be copied)."""
    return [line for line in hlo.splitlines() if " copy(" in line and "[] copy(" not in line]


def test_apply_is_plain_jax_by_default():
    params = wide_params()
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    assert "custom-call" not in _hlo(_apply_step(options), params)

    def update_then_apply_updates(params, state, grads):
        updates, state = adamx.update(grads, state, params, **options)
        params = optax.apply_updates(params, updates)
        return params, state, params

    _, params_out, state = helpers.run(update_then_apply_updates, params, adamx.init(params),
                                       grad_sequence(params, 3))
    helpers.assert_trees_equal(_trajectory(params, options, fused=False, steps=3),
                               (params_out, state.mu, state.nu))


def test_kernel_available_says_whether_the_kernel_is_registered():
    # CI installs adamx with a compiler: a missing or broken build fails here, with the reason.
    assert adamx.kernel_available() is True
    assert _native.status() == (True, "")


OPTIONS = {
    "adam": dict(learning_rate=1e-2),
    "adamw": dict(learning_rate=1e-2, weight_decay=0.05),
    "adamw_masked": dict(learning_rate=3e-3, weight_decay=0.1,
                         mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "eps_root_b1_zero": dict(learning_rate=1e-2, b1=0.0, b2=0.99, eps_root=1e-6),
    "eps_hat": dict(learning_rate=1e-2, eps_hat=True, eps=1e-7),
    "maximize": dict(learning_rate=1e-2, maximize=True),
    "nesterov": dict(learning_rate=1e-2, nesterov=True, weight_decay=0.01),
    "no_bias_correction": dict(learning_rate=1e-3, bias_correction_mu=False,
                               bias_correction_nu=False, nesterov=True),
    "schedule": dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 10)),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_float32_apply_matches_plain_path_over_20_steps(name):
    options = OPTIONS[name]
    params = wide_params() if name in ("adamw_masked", "nesterov", "eps_hat") else nested_params()
    helpers.assert_trees_close(_trajectory(params, options, fused=True),
                               _trajectory(params, options, fused=False), ulps=ULPS, rtol=RTOL)


def test_fused_apply_with_traced_hyperparameters_matches_plain_path():
    params = nested_params()
    hyper = dict(learning_rate=jnp.float32(5e-3), b1=jnp.float32(0.8), b2=jnp.float32(0.95),
                 weight_decay=jnp.float32(0.02), seed=jnp.uint32(7))

    def run(fused):
        def step(params, state, grads, hyper):
            params, state = adamx.apply(grads, state, params, fused=fused, **hyper)
            return params, state, params

        _, params_out, state = helpers.run(step, params, adamx.init(params),
                                           grad_sequence(params, STEPS), extra=(hyper,))
        return params_out, state.mu, state.nu

    helpers.assert_trees_close(run(True), run(False), ulps=ULPS, rtol=RTOL)


def test_fused_apply_matches_float64_reference():
    params = wide_params()
    grads_seq = grad_sequence(params, STEPS)
    leaves = jax.tree.leaves(params)
    ref = ReferenceAdam([(x.shape, False) for x in leaves], lr=1e-2, weight_decay=0.05)
    expected = [np.asarray(x, np.float64) for x in leaves]
    for grads in grads_seq:
        deltas = ref.step([np.asarray(g) for g in jax.tree.leaves(grads)], expected)
        expected = [p + u for p, u in zip(expected, deltas)]
    actual, _, _ = _trajectory(params, dict(learning_rate=1e-2, weight_decay=0.05), fused=True)
    for a, e in zip(jax.tree.leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6)


# ---- memory modes ------------------------------------------------------------------------------

def _mode_params(dtype, seed=0):
    """Leaves that take every format under the int4 and int8 specs: rank-1 second moments (even
    and odd rows), int8 blocks for an odd last axis and a vector, float32 for a small leaf; over
    65,536 elements in all, so the kernel runs threaded."""
    rng = np.random.default_rng(seed)
    shapes = {"wide": (96, 128), "odd": (200, 65), "vector": (5000,), "small": (3, 4),
              "big": (300, 260)}
    return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


MODES = {  # name: (param dtype, init's keywords, apply's keywords)
    "bf16_moments": (jnp.float32, dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), {}),
    "int8": (jnp.float32, dict(mu_dtype="int8", nu_dtype="int8"), {}),
    "int8_blocks_longer_than_a_tile": (
        jnp.float32, dict(mu_dtype=adamx.int8_moments(2048), nu_dtype=adamx.int8_moments(1024)),
        dict(nesterov=True, maximize=True)),
    "int4": (jnp.float32, dict(mu_dtype="int4", nu_dtype="int4"), dict(eps_hat=True)),
    "bf16_nearest": (jnp.bfloat16, {}, {}),
    "bf16_stochastic": (jnp.bfloat16, dict(param_rounding="stochastic"),
                        dict(param_rounding="stochastic", seed=3)),
    "bf16_kahan": (jnp.bfloat16, dict(param_rounding="kahan"), dict(param_rounding="kahan")),
    "bf16_stochastic_int8": (jnp.bfloat16, dict(param_rounding="stochastic", mu_dtype="int8",
                                                nu_dtype="int8"),
                             dict(param_rounding="stochastic")),
    "bf16_kahan_int4": (jnp.bfloat16, dict(param_rounding="kahan", mu_dtype="int4",
                                           nu_dtype="int4"), dict(param_rounding="kahan")),
}


def _scale(x):
    """The largest finite magnitude of a leaf (at least 1)."""
    x = np.abs(np.asarray(x, np.float64))
    return float(np.max(x[np.isfinite(x)], initial=1.0))


def _assert_values_close(actual, expected, scale, where, flips=0.0):
    """float32 or bfloat16 values within the module's bounds (``scale``: the leaf's magnitude),
    but for at most BF16_FLIPS of them within ``flips``, where ``flips`` is given."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    rtol = BF16_RTOL if expected.dtype == jnp.bfloat16 else RTOL
    atol = ULPS * float(np.finfo(np.float32).eps) * scale
    if not flips:
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=where)
        return
    bound = atol + rtol * np.abs(e)
    outside = ~(np.abs(a - e) <= bound)
    assert outside.mean() <= BF16_FLIPS, f"{where}: {outside.sum()} of {outside.size} outside"
    np.testing.assert_array_less(np.abs(a - e), bound + flips, err_msg=where)


def _assert_codes_close(actual, expected, where, *, packed, signed):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    a, e = ((helpers.nibbles(x, signed) if packed else np.asarray(x, np.int64))
            for x in (actual, expected))
    differ = a != e
    assert np.abs(a - e).max(initial=0) <= 1, f"{where}: a code differs by more than one"
    assert differ.mean() <= CODE_FLIPS, f"{where}: {differ.sum()} of {differ.size} codes differ"


def _assert_step_close(fused, plain, flips=0.0):
    """``flips``: the bound of BF16_FLIPS elements of the params and Kahan's compensation."""
    (fused_params, fused_state), (params, state) = fused, plain
    assert jax.tree.structure(fused_state) == jax.tree.structure(state)
    np.testing.assert_array_equal(fused_state.count, state.count)
    treedef = jax.tree.structure(params)
    for k, (path, p) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        where = jax.tree_util.keystr(path)
        _assert_values_close(jax.tree.leaves(fused_params)[k], p, _scale(p), f"params{where}",
                             flips)
        for name in ("mu", "nu", "compensation"):
            if getattr(state, name) is None:
                continue
            actual = treedef.flatten_up_to(getattr(fused_state, name))[k]
            expected = treedef.flatten_up_to(getattr(state, name))[k]
            at = f"state.{name}{where}"
            assert type(actual) is type(expected), at
            if expected is None:
                continue
            if not isinstance(expected, (adamx.Int8Blocks, adamx.Int4Blocks, adamx.Int4Rank1)):
                if name == "compensation":
                    _assert_values_close(actual, expected, _scale(p), at, flips)
                else:
                    _assert_values_close(actual, expected, _scale(expected), at)
                continue
            packed = isinstance(expected, (adamx.Int4Blocks, adamx.Int4Rank1))
            _assert_codes_close(actual.codes, expected.codes, f"{at}.codes", packed=packed,
                                signed=name == "mu")
            for field in expected._fields[1:]:
                _assert_values_close(getattr(actual, field), getattr(expected, field),
                                     _scale(getattr(expected, field)), f"{at}.{field}")


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_apply_of_each_memory_mode_matches_plain_path_step_by_step(mode):
    dtype, init_options, options = MODES[mode]
    options = dict(learning_rate=1e-2, weight_decay=0.01, **options)
    params = _mode_params(dtype)
    state = adamx.init(params, **init_options)
    fused, plain = _apply_step(options, donate=False, fused=True), _apply_step(options, donate=False)
    bf16_moments = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((state.mu, state.nu)))
    flips = options["learning_rate"] / 16 if bf16_moments else 0.0
    for grads in grad_sequence(params, 3, scale=0.1):
        expected = plain(params, state, grads)
        _assert_step_close(fused(params, state, grads), expected, flips)
        params, state = expected


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16_kahan", "bf16_stochastic_int8"])
def test_non_finite_gradients_reach_the_same_elements_and_blocks_as_in_the_plain_path(mode):
    dtype, init_options, options = MODES[mode]
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 128)), dtype)}
    g = np.random.default_rng(1).normal(size=(64, 128))
    g[3, 5], g[10, 7], g[20, 9], g[30, :4] = np.nan, np.inf, -np.inf, 1e30
    grads = {"w": jnp.asarray(g, dtype)}
    state = adamx.init(params, **init_options)
    options = dict(learning_rate=1e-2, **options)
    _assert_step_close(_apply_step(options, donate=False, fused=True)(params, state, grads),
                       _apply_step(options, donate=False)(params, state, grads))


def test_fused_apply_leaves_untrained_integer_params_as_they_are():
    params = {"w": jnp.ones((4, 3)), "steps": jnp.arange(3, dtype=jnp.int32)}
    grads = {"w": jnp.full((4, 3), 0.5), "steps": jnp.zeros(3, jnp.int32)}
    state = adamx.init(params)
    fused = adamx.apply(grads, state, params, learning_rate=0.1, fused=True)
    plain = adamx.apply(grads, state, params, learning_rate=0.1)
    _assert_step_close(fused, plain)


# ---- in place -----------------------------------------------------------------------------------

@pytest.mark.parametrize("init_options", [{}, dict(mu_dtype="int4", nu_dtype="int4")])
def test_fused_apply_is_one_custom_call_in_place_when_donated(init_options):
    # An empty leaf is a constant that XLA copies (zero bytes), so leave it out here.
    params = {k: v for k, v in wide_params().items() if v.size}
    params["rows"] = jnp.ones((64, 128))
    hlo = _hlo(_apply_step(dict(learning_rate=1e-2), fused=True), params,
               adamx.init(params, **init_options))
    assert hlo.count("custom-call(") == 1
    assert _copies(hlo) == []


def test_fused_apply_without_donation_leaves_inputs_unchanged():
    params = wide_params()
    grads = grad_sequence(params, 1)[0]
    state = adamx.init(params, mu_dtype="int8", nu_dtype="int8")
    before = jax.tree.map(np.array, (params, state))
    new_params, _ = _apply_step(dict(learning_rate=1e-2), donate=False, fused=True)(
        params, state, grads)
    helpers.assert_trees_equal((params, state), before)
    assert all(not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(new_params), jax.tree.leaves(before[0])) if b.size)


def test_many_leaves_make_several_custom_calls(monkeypatch):
    monkeypatch.setattr(_native, "GROUP", 3)
    params = wide_params()  # 7 non-empty leaves: calls of 3, 3 and 1
    options = dict(learning_rate=1e-2, weight_decay=0.01)
    assert _hlo(_apply_step(options, fused=True), params).count("custom-call(") == 3
    helpers.assert_trees_close(_trajectory(params, options, fused=True, steps=5),
                               _trajectory(params, options, fused=False, steps=5),
                               ulps=ULPS, rtol=RTOL)


# ---- what the kernel refuses ----------------------------------------------------------------

@pytest.mark.parametrize("params, init_options, options, match", [
    ({"w": jnp.ones(3, jnp.float16)}, {}, {}, r"params\['w'\] is float16\[3\]"),
    ({"w": jnp.ones(3, jnp.complex64)}, {}, {}, r"params\['w'\] is complex64\[3\]"),
    ({"w": jnp.ones(3)}, dict(mu_dtype=jnp.float16), {}, r"state.mu\['w'\] is a float16\[3\]"),
    ({"w": jnp.ones(3)}, dict(amsgrad=True), dict(amsgrad=True), "AMSGrad"),
    ({"w": jnp.ones(3)}, {}, dict(adamax=True), "AdaMax"),
])
def test_fused_apply_refuses_what_the_kernel_does_not_compute(params, init_options, options, match):
    state = adamx.init(params, **init_options)
    with pytest.raises(RuntimeError, match=f"adamx.apply: fused=True but the CPU kernel cannot "
                                           f"run: .*{match}"):
        adamx.apply(params, state, params, learning_rate=1e-2, fused=True, **options)
    adamx.apply(params, state, params, learning_rate=1e-2, **options)  # the plain path runs it


def test_fused_apply_refuses_a_first_moment_in_unsigned_codes():
    params = {"w": jnp.ones((64, 64))}
    state = adamx.init(params, mu_dtype="int8")
    state = state.replace(mu={"w": state.mu["w"]._replace(codes=state.mu["w"].codes.astype(jnp.uint8))})
    with pytest.raises(ValueError, match=r"adamx.apply: state.mu\['w'\] is an Int8Blocks of "
                                         "unsigned codes, but a first moment needs signed ones"):
        adamx.apply(params, state, params, learning_rate=1e-2, fused=True)


def test_fused_apply_refuses_grads_of_another_dtype_than_their_params():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(RuntimeError, match=r"grads\['w'\] float32\[3\]: .* grads of their dtype"):
        adamx.apply({"w": jnp.ones(3)}, adamx.init(params), params, learning_rate=1e-2, fused=True)


def test_fused_apply_refuses_another_backend_and_a_missing_build(monkeypatch):
    params = nested_params()
    state = adamx.init(params)

    def refused(match):
        with pytest.raises(RuntimeError, match=f"adamx.apply: fused=True .*{match}"):
            jax.jit(lambda p, s: adamx.apply(p, s, p, learning_rate=1e-2, fused=True))(params, state)

    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        refused("the kernel is for CPU, and the arrays are on gpu")
    with monkeypatch.context() as m:
        m.setattr(_native, "status", lambda: (False, "no native kernel (test)"))
        refused(r"no native kernel \(test\)")


def test_apply_checks_like_update():
    params = nested_params()
    state = adamx.init(params)
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"adamx.apply: b1 must be in \[0, 1\), got 1.5"):
            adamx.apply(params, state, params, learning_rate=1e-2, b1=1.5, fused=fused)


# ---- devices --------------------------------------------------------------------------------

_EIGHT_DEVICES = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import adamx

found = {"devices": jax.device_count()}
params = {"w": jnp.arange(64.0).reshape(16, 4) / 64, "b": jnp.linspace(-1.0, 1.0, 8)}
grads = jax.tree.map(lambda x: jnp.cos(x) / 2, params)
state = adamx.init(params)
step = jax.jit(lambda g, s, p, fused: adamx.apply(g, s, p, learning_rate=0.1, fused=fused),
               static_argnums=3)


def gap(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


found["one_device_gap"] = gap(step(grads, state, params, True), step(grads, state, params, False))
found["one_device_custom_calls"] = step.lower(grads, state, params, True).as_text().count(
    "custom_call")
mesh = jax.make_mesh((8,), ("data",))
spec = lambda x: NamedSharding(mesh, P("data") if np.ndim(x) else P())
sharded = jax.device_put((grads, state, params), jax.tree.map(spec, (grads, state, params)))
for name, run in (("jit", lambda: step(*sharded, True)),
                  ("eager", lambda: adamx.apply(*sharded, learning_rate=0.1, fused=True))):
    try:
        run()
        found[name] = "ran"
    except RuntimeError as e:
        found[name] = str(e)
specs = jax.tree.map(lambda x: P("data") if np.ndim(x) else P(), (grads, state, params))
per_device = jax.jit(jax.shard_map(lambda g, s, p: adamx.apply(g, s, p, learning_rate=0.1,
                                                               fused=True),
                                   mesh=mesh, in_specs=specs, out_specs=specs[1:][::-1]))
found["shard_map_gap"] = gap(per_device(*sharded), step(grads, state, params, False))
print(json.dumps(found))
"""


def test_fused_apply_decides_by_where_the_arrays_are_on_8_host_devices():
    found = helpers.run_with_devices(_EIGHT_DEVICES, 8)
    assert found["devices"] == 8
    # One device's arrays, with 8 devices in the process: the kernel runs.
    assert found["one_device_custom_calls"] == 1 and found["one_device_gap"] <= 1e-6
    # Arrays sharded over the 8 devices: refused, with the reason and the remedy.
    for name in ("jit", "eager"):
        assert "sharded over several devices" in found[name], found[name]
        assert "inside shard_map, each device's" in found[name]
    # Inside shard_map each device steps its own shard: the kernel runs there.
    assert found["shard_map_gap"] <= 1e-6


def test_fused_stochastic_rounding_never_rounds_a_finite_param_up_to_infinity():
    # -max moved by -0.4 gap is below the overflow threshold: nearest gives -max, and so must
    # the kernel's stochastic rounding, as the plain path's does (tests/test_rounding.py).
    top = np.float64(jnp.finfo(jnp.bfloat16).max)
    gap = top - np.float64(np.nextafter(np.asarray(top, ml_dtypes.bfloat16),
                                        np.asarray(0, ml_dtypes.bfloat16)))
    params = {"w": jnp.full((64, 128), -top, jnp.bfloat16)}
    grads = {"w": jnp.ones((64, 128), jnp.bfloat16)}
    options = dict(learning_rate=0.4 * gap, eps=0.0, param_rounding="stochastic")
    new, _ = _apply_step(options, donate=False, fused=True)(params, adamx.init(params), grads)
    np.testing.assert_array_equal(np.asarray(new["w"], np.float64), -top)
