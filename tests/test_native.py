"""The native kernel (``adamx._native``): its build and loading, its ABI, and its arithmetic.

The oracles are written from the documents, not from the kernel: NumPy transcriptions of
``abi.h``'s per-element step (in float64, to find where each scalar enters; in float32, one NumPy
operation per IEEE operation, for the exact bits of every instruction-set variant), and
``tests/quantize_oracle.py`` for the code tables, the stochastic rounding rule and the random
bits of quantized moments. The kernel is called through ``_native.step``, as
``adamx.apply(..., fused=True)`` calls it; ``tests/test_fused.py`` tests apply against the plain
path. The tests fail, not skip, when the kernel is not built.
"""

import itertools
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import adamx
from adamx import _native, _numerics, _options
from adamx._fused import kernel_scalars
from adamx._update import Rule
from tests import helpers
from tests import quantize_oracle as oracle

FLAG_SETS = [dict(zip(("maximize", "eps_hat", "nesterov"), bits))
             for bits in itertools.product([False, True], repeat=3)]
SEED, COUNT, STREAM = 11, 7, 0x1234ABCD  # the random bits' (seed, count, stream) in these tests
CODE_FLIPS = 1e-3  # see _assert_codes_match_the_oracle


def _ext():
    ok, why = _native.status()
    assert ok, why
    return _native._import_ext()


def _scalars(count=7, **hyper):
    """The kernel's scalars of a step (adamx._fused.kernel_scalars, the one place they are made)."""
    hp = _options.Hyperparams(**{"learning_rate": 1e-2, "b1": 0.85, "b2": 0.98, "eps": 1e-7,
                                 "eps_root": 1e-9, "weight_decay": 0.02, **hyper})
    return {k: np.float32(v) for k, v in
            kernel_scalars(jnp.int32(count), hp, Rule(nesterov=True, eps_hat=True)).items()}


def _keys():
    """uint32[2]: the param's and the moments' keys of (SEED, COUNT, STREAM), as apply makes them."""
    return jnp.stack([_numerics.bits_key(SEED, COUNT, STREAM),
                      _numerics.bits_key(SEED, COUNT, STREAM ^ _numerics.MOMENTS)])


def _step(scalars, leaf, isa=None, **flags):
    """One kernel step of one leaf: its new (param, mu, nu, compensation) as NumPy arrays."""
    flags = {"maximize": False, "eps_hat": False, "nesterov": False, **flags}
    new = _native.step({k: jnp.float32(v) for k, v in scalars.items()}, [leaf], isa=isa,
                       **flags)[0]
    return jax.tree.map(np.asarray, new)


# ---- build, loading and ABI -------------------------------------------------------------------

def test_native_kernel_is_built_and_registered():
    # CI installs adamx with a compiler: a missing or broken build fails here, with the reason.
    assert _native.status() == (True, "")


def test_importing_adamx_loads_no_native_code():
    code = ("import sys, adamx, jax.numpy as jnp; adamx.adam(1e-3); "
            "assert 'adamx._native._ext' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_module_exports_the_abi_that_python_speaks():
    ext = _ext()
    assert ext.ABI_VERSION == _native.ABI_VERSION
    assert ext.TARGET == "adamx_adam_step"
    assert set(ext.SCALARS) == set(_scalars()) and len(set(ext.SCALARS)) == len(ext.SCALARS)
    assert ext.FLAGS == {"maximize": 1, "eps_hat": 2, "nesterov": 4}
    assert tuple(ext.LEAF_FIELDS) == ("param", "rounding", "mu", "nu", "decay", "mu_block",
                                      "nu_block")
    assert set(ext.PARAM_DTYPES) == {"float32", "bfloat16"}
    assert set(ext.ROUNDINGS) == set(_options.ROUNDINGS)
    arrays = {"float32": 1, "bfloat16": 1, "int8_blocks": len(adamx.Int8Blocks._fields),
              "int4_blocks": len(adamx.Int4Blocks._fields),
              "int4_rank1": len(adamx.Int4Rank1._fields)}
    assert {k: n for k, (_, n) in ext.MOMENT_FORMATS.items()} == arrays
    for codes in (ext.PARAM_DTYPES, ext.ROUNDINGS, ext.MOMENT_FORMATS):
        assert len({v if isinstance(v, int) else v[0] for v in codes.values()}) == len(codes)
    # The XLA FFI API the build was made against: 0.1 to 0.3 are the jaxlibs adamx supports
    # (0.7.2 to 0.10.2), and this process's jaxlib accepted it (the kernel registered).
    assert (0, 1) <= tuple(ext.FFI_API_VERSION) <= (0, 3) and _native.MIN_JAXLIB == (0, 7, 2)


def test_a_stale_build_an_old_jaxlib_and_a_missing_build_are_refused_with_the_reason(monkeypatch):
    import jaxlib

    ext = _ext()
    with monkeypatch.context() as m:
        m.setattr(_native, "_import_ext", lambda: types.SimpleNamespace(ABI_VERSION=1))
        ext_, why = _native._load.__wrapped__()
        assert ext_ is None and "a stale build" in why and "ABI 1" in why
    with monkeypatch.context() as m:
        m.setattr(jaxlib, "__version__", "0.7.1")
        ext_, why = _native._load.__wrapped__()
        assert ext_ is None and "needs jaxlib >= 0.7.2, and jaxlib 0.7.1 is installed" in why
    with monkeypatch.context() as m:
        def refuse(*args, **kwargs):
            raise RuntimeError("the handler's API version (0.9) is incompatible")

        m.setattr(jax.ffi, "register_ffi_target", refuse)
        ext_, why = _native._load.__wrapped__()
        assert ext_ is None and "API version (0.9) is incompatible" in why
        assert f"XLA FFI API {ext.FFI_API_VERSION[0]}.{ext.FFI_API_VERSION[1]}" in why
        assert f"jaxlib {jaxlib.__version__} is installed" in why

    def not_built():
        raise ModuleNotFoundError("No module named 'adamx._native._ext'")

    monkeypatch.setattr(_native, "_import_ext", not_built)
    ext_, why = _native._load.__wrapped__()
    assert ext_ is None and "installed without its native kernel" in why and "pip install" in why
    monkeypatch.setattr(_native, "_load", _native._load.__wrapped__)
    assert _native.status() == (False, why)
    with pytest.raises(RuntimeError, match="installed without its native kernel"):
        _native.step({}, [], maximize=False, eps_hat=False, nesterov=False)


def test_the_handler_refuses_operands_that_break_the_abi():
    ext = _ext()
    scalars = jnp.asarray([_scalars()[k] for k in ext.SCALARS], jnp.float32)
    keys = jnp.zeros(2, jnp.uint32)
    x = jnp.ones(8)
    f32 = ext.MOMENT_FORMATS["float32"][0]
    fields = dict(param=0, rounding=0, mu=f32, nu=f32, decay=0, mu_block=0, nu_block=0)

    def call(operands, isa=-1, **changed):
        leaf = [{**fields, **changed}[name] for name in ext.LEAF_FIELDS]
        results = [jax.ShapeDtypeStruct(a.shape, a.dtype) for j, a in enumerate(operands) if j != 1]
        return jax.ffi.ffi_call(ext.TARGET, results)(
            scalars, keys, *operands, flags=np.int64(0), leaves=np.asarray(leaf, np.int64),
            isa=np.int64(isa))

    assert np.isfinite(call([x, x, x, x])[0]).all()  # the call itself works
    codes = jnp.zeros(8, jnp.uint8)
    for operands, changed, match in [
        ([x, x, x, x], dict(mu=9), "unknown format of mu"),
        ([x, x, codes, jnp.ones(1), x], dict(mu=ext.MOMENT_FORMATS["int8_blocks"][0], mu_block=8),
         "int8 codes has the wrong dtype"),
        ([x, x, codes.astype(jnp.int8), jnp.ones(2), x],
         dict(mu=ext.MOMENT_FORMATS["int8_blocks"][0], mu_block=8), "int8 absmax has 2 elements"),
        ([x, x, x, x], dict(rounding=ext.ROUNDINGS["kahan"]), "rounding does not fit"),
        ([x, x, x], {}, "missing the operand nu"),
        ([x, x, x, x, x], {}, "more operands or results than leaves"),
    ]:
        with pytest.raises(Exception, match=match):
            call(operands, **changed)
    with pytest.raises(Exception, match="cannot run that variant"):
        call([x, x, x, x], isa=len(ext.ISAS))


# ---- where each scalar and flag enters -----------------------------------------------------

@pytest.mark.parametrize("name", list(_scalars()))
def test_each_scalar_enters_the_kernel_where_abi_h_says(name):
    rng = np.random.default_rng(1)
    n = 1000
    p, m = (rng.normal(size=n).astype(np.float32) for _ in range(2))
    g = (0.03 * rng.normal(size=n)).astype(np.float32)
    v = (1e-3 * rng.random(n)).astype(np.float32)
    # Distinct values, so that any two scalars read in each other's place change the result.
    base = dict(zip(_ext().SCALARS, np.linspace(0.11, 0.97, len(_ext().SCALARS))))
    base.update(scale=-0.05, eps=1e-3, eps_root=2e-4)
    used = False
    for flags in (FLAG_SETS[0], FLAG_SETS[-1]):
        outs = []
        for factor in (1.0, 1.5):
            s = {k: np.float32(x * factor if k == name else x) for k, x in base.items()}
            leaf = _native.Leaf(p, g, m, v, None, "nearest", True, _keys())
            new_p, new_m, new_v, _ = _step(s, leaf, **flags)
            expected = _abi_h_float32(s, p, g, m, v, None, decay=True, rounding=None,
                                      stored="float32", **flags)[:3]
            for a, e in zip((new_p, new_m, new_v), expected):
                np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-7)
            outs.append(new_p)
        used |= not np.array_equal(outs[0], outs[1])
    assert used, f"the kernel's result does not depend on {name}"


# ---- the bits of every variant: a float32 transcription of abi.h --------------------------------

def _bf16(x):
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _stochastic_bf16(x, bits):
    """adamx's documented stochastic rounding to bfloat16: random low bits added, then cut off; to
    nearest where that gives infinity."""
    raw = np.asarray(x, np.float32).view(np.uint32)
    cut = ((raw + (bits >> np.uint32(16))) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isfinite(x) & np.isfinite(cut), cut, _bf16(x))


def _abi_h_float32(s, p, g, m, v, c, *, maximize, eps_hat, nesterov, decay, rounding, stored):
    """abi.h's step in float32, one NumPy operation per IEEE operation (NumPy contracts nothing).

    p, c: the param and compensation as float32 values; ``stored``: the moments' storage dtype
    ("float32" or "bfloat16"). Returns the new (p, m, v, c) as float32 values.
    """
    s = {k: np.float32(x) for k, x in s.items()}
    g = -g if maximize else g
    m = s["omb1"] * g + s["b1"] * m
    v = s["omb2"] * (g * g) + s["b2"] * v
    v_stored = v
    if stored == "bfloat16":  # m to nearest, used as stored; v stochastically, used unrounded
        bits = oracle.random_bits(v.shape, SEED, COUNT, STREAM ^ oracle.MOMENTS)
        m, v_stored = _bf16(m), _stochastic_bf16(v, bits)
    m_hat = s["nesterov_m"] * m + s["nesterov_g"] * g if nesterov else m * s["inv_bc1"]
    if eps_hat:
        d = m_hat * (s["step_scale"] / (np.sqrt(v + s["eps_root"]) + s["eps"]))
    else:
        d = m_hat / (np.sqrt(v * s["inv_bc2"] + s["eps_root"]) + s["eps"])
    if decay:
        d = d + s["weight_decay"] * p
    u = s["scale"] * d
    if rounding is None:
        return p + u, m, v_stored, c
    if rounding == "nearest":
        step = _bf16(u)
    elif rounding == "stochastic":
        bits = oracle.random_bits(p.shape, SEED, COUNT, STREAM)
        step = _bf16(_stochastic_bf16(p + u, bits) - p)
    else:
        exact = p + (u + c)
        step = _bf16(_bf16(exact) - p)
    landed = _bf16(p + step)
    return landed, m, v_stored, (_bf16(exact - landed) if rounding == "kahan" else c)


def _float_data(n, seed=0):
    """float32 operands over many magnitudes, with zeros and negative zeros, and no step that
    reaches a denormal (the kernel flushes them to zero, as XLA:CPU does; NumPy does not)."""
    rng = np.random.default_rng(seed)

    def spread(low, high):
        x = rng.normal(size=n) * 10.0 ** rng.uniform(low, high, size=n)
        x[rng.random(n) < 0.05] = 0.0
        x[rng.random(n) < 0.02] = -0.0
        return x.astype(np.float32)

    return spread(-3, 2), spread(-3, 2), spread(-3, 1), np.abs(spread(-6, 2))


KINDS = {  # name: (param dtype, rounding, moments' dtype)
    "float32": ("float32", None, "float32"),
    "float32_bf16_moments": ("float32", None, "bfloat16"),
    "bf16_nearest": ("bfloat16", "nearest", "bfloat16"),
    "bf16_stochastic": ("bfloat16", "stochastic", "float32"),
    "bf16_kahan": ("bfloat16", "kahan", "bfloat16"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_instruction_set_variant_gives_the_float32_bits_of_abi_h(kind):
    param, rounding, stored = KINDS[kind]
    s = _scalars()
    n = 70_001  # threaded, and no multiple of a vector width
    p, g, m, v = _float_data(n)
    c = np.zeros(n, np.float32)
    if param == "bfloat16":
        p, g = _bf16(p), _bf16(g)
        c = _bf16(np.where(np.arange(n) % 3, p * 2.0**-10, 0.0))
    if stored == "bfloat16":
        m, v = _bf16(m), _bf16(v)
    dtype = jnp.dtype(param)
    moment = jnp.dtype(stored)
    leaf_arrays = (jnp.asarray(p, dtype), jnp.asarray(g, dtype), jnp.asarray(m, moment),
                   jnp.asarray(v, moment))
    supported = _ext().SUPPORTED_ISAS
    assert supported[0] == "baseline" and _ext().DISPATCHED_ISA == supported[-1]
    for flags, decay in itertools.product(FLAG_SETS, (False, True)):
        leaf = _native.Leaf(*leaf_arrays, jnp.asarray(c, jnp.bfloat16) if rounding == "kahan"
                            else None, rounding or "nearest", decay, _keys())
        expected = _abi_h_float32(s, p, g, m, v, c, decay=decay, rounding=rounding, stored=stored,
                                  **flags)
        for isa in supported:
            new_p, new_m, new_v, new_c = _step(s, leaf, isa=isa, **flags)
            actual = [new_p, new_m, new_v] + ([new_c] if rounding == "kahan" else [])
            for name, a, e in zip(("p", "m", "v", "c"), actual, expected):
                np.testing.assert_array_equal(
                    np.asarray(a, np.float32).view(np.uint32), np.asarray(e).view(np.uint32),
                    err_msg=f"{kind}, {name}, {isa}, {flags}, decay {decay}")


# ---- quantized moments: the codes of the quantization oracle ----------------------------------

def _random_state(shape, mu_format, nu_format, rng, block_mu=256, block_nu=256):
    """Random stored moments of a leaf (codes of every value, scales over 8 decades), and their
    decoded values by the oracle's tables (float32)."""
    size, rows, cols = int(np.prod(shape)), int(np.prod(shape[:-1])), shape[-1]

    def scales(count, dtype=np.float32):
        return (rng.uniform(0.5, 1.0, count) * 10.0 ** rng.uniform(-6, 2, count)).astype(dtype)

    def blockwise(values, absmax, block):
        return (values * np.repeat(np.asarray(absmax, np.float32), block)[:size].reshape(shape))

    if mu_format == "int8":
        codes = rng.integers(-127, 128, size=shape).astype(np.int8)
        absmax = scales(-(-size // block_mu))
        mu = adamx.Int8Blocks(jnp.asarray(codes), jnp.asarray(absmax))
        values = np.sign(codes) * oracle.SIGNED8[np.abs(codes)].astype(np.float32)
        m = blockwise(values.astype(np.float32), absmax, block_mu)
    else:
        codes = rng.integers(-7, 8, size=shape)
        absmax = scales(-(-size // block_mu), ml_dtypes.bfloat16)
        packed = ((codes[..., 0::2] & 15) | ((codes[..., 1::2] & 15) << 4)).astype(np.uint8)
        mu = adamx.Int4Blocks(jnp.asarray(packed.view(np.int8)), jnp.asarray(absmax))
        values = np.sign(codes) * oracle.SQUARE4[np.abs(codes)].astype(np.float32)
        m = blockwise(values.astype(np.float32), absmax.astype(np.float32), block_mu)
    if nu_format == "int8":
        codes = rng.integers(0, 256, size=shape).astype(np.uint8)
        absmax = scales(-(-size // block_nu))
        nu = adamx.Int8Blocks(jnp.asarray(codes), jnp.asarray(absmax))
        v = blockwise(oracle.UNSIGNED8[codes].astype(np.float32), absmax, block_nu)
    else:
        codes = rng.integers(0, 16, size=shape)
        padded = np.pad(codes, [(0, 0)] * (len(shape) - 1) + [(0, cols % 2)])
        packed = (padded[..., 0::2] | (padded[..., 1::2] << 4)).astype(np.uint8)
        row_max, col_max = scales(rows).reshape(shape[:-1]), scales(cols)
        nu = adamx.Int4Rank1(jnp.asarray(packed), jnp.asarray(row_max), jnp.asarray(col_max))
        scale = np.minimum(row_max.reshape(-1, 1), col_max[None, :]).reshape(shape)
        v = oracle.LINEAR4[codes].astype(np.float32) * scale
    return mu, nu, m.astype(np.float32), v.astype(np.float32)


def _expected_codes(x, scale, table, u, *, signed):
    """Each value's code by the oracle: |x| / scale (float64) rounded stochastically in ``table``
    (0 first) with the uniforms ``u``; a positive second moment never becomes 0."""
    y = np.abs(x.astype(np.float64)) / np.where(scale > 0, scale, 1.0)
    rounded = oracle.round_to(y, table, u, no_zero=not signed)
    code = np.searchsorted(table, rounded)
    return np.where(scale > 0, np.sign(x) * code if signed else code, 0).astype(np.int64)


def _assert_codes_match_the_oracle(actual, expected, where):
    """A float32 product can fall on the other side of a rounding threshold from the float64
    ratio: at most CODE_FLIPS of the codes differ, each by one."""
    differ = actual != expected
    assert np.abs(actual - expected).max(initial=0) <= 1, where
    assert differ.mean() <= CODE_FLIPS, f"{where}: {differ.sum()} of {differ.size} codes differ"


QUANTIZED = {  # name: (shape, mu format, nu format, mu block, nu block)
    "int8": ((300, 260), "int8", "int8", 256, 256),
    "int8_blocks_longer_than_a_tile": ((100, 300), "int8", "int8", 4096, 1024),
    "int4": ((260, 300), "int4", "rank1", 32, 0),
    "int4_odd_columns": ((300, 65), "int8", "rank1", 256, 0),
}


def _blocks(x, block):
    """x flattened into rows of ``block`` (the last one padded with zeros)."""
    return np.pad(x.reshape(-1), (0, -x.size % block)).reshape(-1, block)


def _per_element(per_block, block, shape):
    return np.repeat(per_block, block)[:int(np.prod(shape))].reshape(shape)


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_every_variant_stores_quantized_moments_as_the_quantization_oracle_rounds_them(name):
    shape, mu_format, nu_format, block_mu, block_nu = QUANTIZED[name]
    rng = np.random.default_rng(5)
    s = _scalars()
    p, g = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    mu, nu, m_old, v_old = _random_state(shape, mu_format, nu_format, rng, block_mu, block_nu)
    leaf = _native.Leaf(jnp.asarray(p), jnp.asarray(g), mu, nu, None, "nearest", True, _keys())
    results = {isa: _step(s, leaf, isa=isa) for isa in _ext().SUPPORTED_ISAS}
    new_p, new_mu, new_nu, _ = results[_ext().DISPATCHED_ISA]
    for isa, result in results.items():  # every variant gives the same bits
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(results[_ext().DISPATCHED_ISA])):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: {isa}")

    # The new moments and param by the float32 transcription, from the oracle's decoded values:
    # the param steps with the moments unrounded.
    p_new, m, v, _ = _abi_h_float32(s, p, g, m_old, v_old, None, maximize=False, eps_hat=False,
                                    nesterov=False, decay=True, rounding=None, stored="float32")
    helpers.assert_trees_close(new_p, p_new)
    bits = oracle.random_bits(shape, SEED, COUNT, STREAM ^ oracle.MOMENTS)
    u_mu, u_nu = (bits & 0xFFFF) / 2.0**16, (bits >> 16) / 2.0**16
    v = np.minimum(v, np.finfo(np.float32).max)  # an overflowed square saturates
    peak = np.abs(_blocks(m, block_mu)).max(axis=1)
    if mu_format == "int8":
        np.testing.assert_array_equal(new_mu.absmax, peak)
        codes = _expected_codes(m, _per_element(peak, block_mu, shape), oracle.SIGNED8, u_mu,
                                signed=True)
        _assert_codes_match_the_oracle(np.asarray(new_mu.codes, np.int64), codes, "mu")
    else:
        scale = np.array([oracle.bfloat16_up(x) for x in peak])
        np.testing.assert_allclose(np.asarray(new_mu.absmax, np.float64), scale, rtol=2.0**-7)
        codes = _expected_codes(m, _per_element(scale, block_mu, shape), oracle.SQUARE4, u_mu,
                                signed=True)
        _assert_codes_match_the_oracle(helpers.nibbles(new_mu.codes, signed=True), codes, "mu")
    if nu_format == "int8":
        peak = _blocks(v, block_nu).max(axis=1)
        np.testing.assert_array_equal(new_nu.absmax, peak)
        codes = _expected_codes(v, _per_element(peak, block_nu, shape), oracle.UNSIGNED8, u_nu,
                                signed=False)
        _assert_codes_match_the_oracle(np.asarray(new_nu.codes, np.int64), codes, "nu")
    else:
        rows, cols = v.max(axis=1), v.max(axis=0)
        np.testing.assert_array_equal(new_nu.row_max, rows)
        np.testing.assert_array_equal(new_nu.col_max, cols)
        codes = _expected_codes(v, np.minimum(rows[:, None], cols[None, :]), oracle.LINEAR4, u_nu,
                                signed=False)
        actual = helpers.nibbles(new_nu.codes, signed=False)[:, :shape[-1]]
        _assert_codes_match_the_oracle(actual, codes, "nu")
        if shape[-1] % 2:  # the padding nibble of an odd row stays 0
            assert not helpers.nibbles(new_nu.codes, signed=False)[:, -1].any()
