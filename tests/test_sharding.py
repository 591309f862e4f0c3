"""adamx on 8 simulated CPU devices: the state follows the params' shardings, and ZeRO-1.

All checks run in one subprocess (`tests/_workers/sharding_checks.py`, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so JAX's start-up is paid once); it prints
what it observed as JSON, and each test below makes one claim about it. The oracles: the params'
own shardings, byte counts from each device's shards against the documented split rule, the
compiled HLO's text, and ``optax.adam`` / ``optax.adamw`` on a single device. The model is the
64-128-10 MLP of `tests/_workers/mlp.py`, trained on seeded NumPy data.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import adamx
from tests.helpers import run_worker

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
# After 10 Adam steps at lr 1e-2, adamx and optax on ONE device already differ by ~1.5e-6 (float32
# rounding in a different order, grown by m / sqrt(v) for tiny gradients); params move ~0.1.
FLOAT32_TOLERANCE = 1e-5
# A float32 rounding difference can flip an 8-bit code, which changes that element's step by up
# to about one learning rate (1e-2 in these runs); all other elements must agree to float32.
INT8_FLIP_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def findings():
    return run_worker("sharding_checks")


def moment_specs_follow_params(state_specs, param_specs, fields=("mu", "nu")):
    for field in fields:
        for key, spec in param_specs.items():
            assert state_specs[f".{field}{key}"] == spec, (field, key)


def test_jit_init_state_follows_params_shardings_on_explicit_mesh(findings):
    explicit = findings["explicit"]
    moment_specs_follow_params(explicit["jit_init"], explicit["params"])
    assert explicit["jit_init"][".count"] == "P()"
    assert explicit["jit_init_count_replicated"] and explicit["jit_init_count_devices"] == 8


def test_amsgrad_nu_max_follows_params_shardings(findings):
    explicit = findings["explicit"]
    moment_specs_follow_params(explicit["amsgrad_jit_init"], explicit["params"],
                               fields=("mu", "nu", "nu_max"))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_eager_init_on_sharded_params_follows_their_shardings(findings, axis_type):
    found = findings[axis_type]
    moment_specs_follow_params(found["eager_init"], found["params"])
    assert found["eager_init"][".count"] == "P()" and found["eager_init_count_devices"] == 8


def test_eval_shape_plans_the_state_with_shardings(findings):
    explicit = findings["explicit"]
    moment_specs_follow_params(explicit["eval_shape"], explicit["params"])
    shapes = explicit["eval_shape_shapes"]
    assert shapes[".count"] == [[], "int32"]
    assert shapes[".mu['w']"] == [[16, 32], "float32"] == shapes[".nu['w']"]
    assert shapes[".mu['scale']"] == [[], "float32"]


def test_ten_updates_keep_the_state_shardings(findings):
    explicit = findings["explicit"]
    assert explicit["count_after_updates"] == 10
    assert explicit["after_updates"] == explicit["jit_init"]
    assert explicit["params_after_updates"] == explicit["params"]


def test_update_of_data_and_model_sharded_params_inserts_no_collective(findings):
    for name in COLLECTIVES:
        assert findings["explicit"]["update_hlo_collectives"][name] == 0, name


@pytest.mark.parametrize("n", ["1", "2", "4", "8"])
def test_zero1_state_bytes_per_device_fall_as_one_over_n(findings, n):
    found = findings["zero1_bytes"][n]
    assert len(found["per_device"]) == int(n)
    assert set(found["per_device"]) == {found["predicted"]}


def test_zero1_state_per_device_is_one_eighth_for_leaves_that_divide(findings):
    found = findings["zero1_bytes"]["8"]
    # The 64-128-10 MLP: only the (10,) output bias and the int32 count do not divide by 8.
    undivided = 2 * 10 * 4 + 4
    assert found["per_device"][0] - undivided == (found["total"] - undivided) // 8


def test_zero1_shards_moments_on_largest_divisible_dimension_and_keeps_params_whole(findings):
    found = findings["zero1_bytes"]["8"]
    assert found["specs"][".mu['dense_0']['kernel']"] == "P(None, 'data')"  # (64, 128)
    assert found["specs"][".nu['dense_1']['kernel']"] == "P('data', None)"  # (128, 10)
    assert found["specs"][".mu['dense_1']['bias']"] == "P(None,)"  # (10,): 8 does not divide
    assert found["specs"][".count"] == "P()"
    assert not any("data" in spec for spec in found["params_specs"].values())


def test_zero1_update_gathers_each_split_update_once_and_never_the_moments(findings):
    found = findings["zero1_hlo_collectives"]
    assert found["all_gather_bytes"] == found["split_param_bytes"] > 0
    for name in ("all-to-all", "collective-permute", "all-reduce", "reduce-scatter"):
        assert found["collectives"][name] == 0, name


@pytest.mark.parametrize("run", ["adam_zero1", "adamw_zero1"])
def test_data_parallel_params_after_ten_steps_equal_single_device_optax(findings, run):
    found = findings["equality"][run]
    assert found["vs_optax"] <= FLOAT32_TOLERANCE, found
    assert found["vs_one_device"] <= FLOAT32_TOLERANCE, found
    assert found["max_param_change"] > 1e3 * FLOAT32_TOLERANCE  # the params really moved


def test_zero1_int8_moments_split_with_whole_blocks_and_decode_locally(findings):
    found = findings["quantized_zero1_auto"]
    aligned, short = found["aligned"], found["short_rows"]
    assert "error" not in aligned, aligned
    assert aligned["specs"] == {".codes": "P('data', None)", ".absmax": "P('data',)"}
    assert aligned["per_device"] * 8 == aligned["total"] and aligned["decode_equal"]
    assert short["specs"] == {".codes": "P(None, None)", ".absmax": "P(None,)"}
    for name in COLLECTIVES:
        assert aligned["decode_hlo_collectives"][name] == 0, name


def test_zero1_int8_moments_decode_on_explicit_mesh(findings):
    assert "error" not in findings["quantized_zero1_explicit"]["aligned"]


def test_zero1_int8_state_after_ten_steps_equals_single_device_run(findings):
    found = findings["int8_auto"]
    assert found["available"], f"int8 moments are not available: {found['reason']}"
    assert "error" not in found, found
    # quantiles 0.5, 0.99, 0.999 of |difference|: the data-parallel gradients differ from one
    # device's in their last bits, which now and then moves a stochastic rounding decision by one
    # code, and that element's param a little; the change then reaches the other params' gradients
    # (on jax 0.7.2, with 10 steps, the 0.999 quantile came to 7e-5), so 99% must agree to float32
    q99 = found["diff_quantiles"][1]
    assert q99 <= FLOAT32_TOLERANCE, found
    assert found["vs_one_device"] <= INT8_FLIP_TOLERANCE, found
    assert found["specs"][".mu['dense_0']['kernel'].codes"] == "P('data', None)"


def test_zero1_int4_moments_split_rank1_by_rows_and_train_like_one_device(findings):
    rank1 = findings["quantized_zero1_auto"]["int4_rank1"]
    assert rank1["specs"] == {".codes": "P('data', None)", ".row_max": "P('data',)",
                              ".col_max": "P(None,)"}
    assert rank1["decode_equal"] and not any(rank1["decode_hlo_collectives"].values())
    found = findings["int4_auto"]
    assert found["available"] and "error" not in found, found
    assert found["diff_quantiles"][1] <= FLOAT32_TOLERANCE, found
    assert found["vs_one_device"] <= INT8_FLIP_TOLERANCE, found


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bfloat16_params_with_rounding_train_under_zero1_and_offload_like_one_device(findings,
                                                                                      rounding):
    found = findings[rounding]
    # The data-parallel gradients of a bfloat16 model round differently on 8 devices, so a few
    # params land one rounding step apart; none drifts further.
    assert found["equal_fraction"] > 0.9, found
    assert found["max_leaf_ulps"] <= 2, found
    assert found["max_param_change"] > 10 * 2.0**-8  # the params really moved
    # offloading the ZeRO-1 state to the host changes where it lives, not one bit of the result
    if adamx._sharding.jit_keeps_pinned_host("cpu"):
        assert found["offload_error"] is None
        assert found["offload_equal"] and found["offload_kinds"] == ["pinned_host"], found
    else:  # XLA:CPU before jaxlib 0.10.2: update refuses the host-resident state, and says why
        assert "host offload on CPU needs jaxlib >= 0.10.2" in found["offload_error"], found
    if rounding == "kahan":  # the compensation is split like the moments
        assert found["compensation_specs"]["['dense_1']['kernel']"] == "P('data', None)"


# The split rule itself, on an abstract 8 x 2 mesh: no devices needed, so these run in-process.


def abstract_mesh():
    return AbstractMesh((8, 2), ("data", "model"))


def zero1_specs(tree, mesh):
    shardings = adamx.zero1_shardings(tree, mesh)
    return {jax.tree_util.keystr(k): tuple(s.spec)
            for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def test_zero1_rule_takes_largest_divisible_dimension_and_leading_on_ties():
    tree = {"wide": jax.ShapeDtypeStruct((24, 64), jnp.float32),
            "tall": jax.ShapeDtypeStruct((64, 24, 3), jnp.float32),
            "square": jax.ShapeDtypeStruct((16, 16), jnp.float32),
            "odd_first": jax.ShapeDtypeStruct((7, 40), jnp.float32)}
    assert zero1_specs(tree, abstract_mesh()) == {
        "['wide']": (None, "data"), "['tall']": ("data", None, None),
        "['square']": ("data", None), "['odd_first']": (None, "data")}


def test_zero1_rule_replicates_scalars_and_leaves_that_do_not_divide():
    tree = {"count": jax.ShapeDtypeStruct((), jnp.int32),
            "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),
            "bias": jax.ShapeDtypeStruct((10,), jnp.float32)}
    assert zero1_specs(tree, abstract_mesh()) == {
        "['count']": (), "['odd']": (None, None), "['bias']": (None,)}


def test_zero1_rule_keeps_a_model_split_and_adds_data_on_a_free_dimension():
    mesh = abstract_mesh()

    def leaf(shape, *spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))

    tree = {"model_only": leaf((8, 64), None, "model"),
            "both": leaf((16, 32), "data", "model"),
            "no_free_dim": leaf((32,), "model")}
    assert zero1_specs(tree, mesh) == {
        "['model_only']": ("data", "model"), "['both']": ("data", "model"),
        "['no_free_dim']": ("model",)}


def test_zero1_rule_splits_int8_moments_as_whole_blocks_or_not_at_all():
    params = {"aligned": jax.ShapeDtypeStruct((64, 128), jnp.float32),  # 32 blocks of 256
              "short_rows": jax.ShapeDtypeStruct((8, 1100), jnp.float32)}  # 1100 per device
    state = jax.eval_shape(lambda p: adamx.init(p, mu_dtype="int8"), params)
    specs = zero1_specs(state.mu, abstract_mesh())
    assert specs["['aligned'].codes"] == ("data", None) and specs["['aligned'].absmax"] == ("data",)
    assert specs["['short_rows'].codes"] == (None, None)
    assert specs["['short_rows'].absmax"] == (None,)


def test_zero1_rejects_an_axis_the_mesh_lacks():
    with pytest.raises(ValueError, match="axis must be one of the mesh axes"):
        adamx.zero1_shardings({"w": jax.ShapeDtypeStruct((8,), jnp.float32)}, abstract_mesh(),
                              axis="batch")
