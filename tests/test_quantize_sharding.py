"""Quantized moments on 8 simulated CPU devices: ZeRO-1 splits each moment as one unit, the state
follows row-sharded params, and both runs equal the single-device one bit for bit.

All checks run in one subprocess (``tests/_workers/quantize_sharding.py``); it prints what it saw
as JSON, and each test makes one claim about it. The oracles: the single-device run, the documented
split rule, byte counts of each device's shards, and the collectives in the compiled HLO.
"""

import jaxlib
import pytest

import adamx
from tests.helpers import run_worker


@pytest.fixture(scope="module")
def found():
    return run_worker("quantize_sharding")


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_zero1_and_row_sharded_runs_equal_the_single_device_run(found, spec):
    assert found[spec]["zero1_equal"] and found[spec]["follow_equal"]


def test_zero1_of_mixed_formats_and_kahan_with_and_without_offload_equals_one_device(found):
    # int8 mu beside float32 nu, int4 beside Kahan's compensation: a param's entries split alike;
    # host offload needs jaxlib 0.10.2 on CPU, and before it is refused by name
    offload = True if adamx._sharding.jit_keeps_pinned_host("cpu") else (
        "ValueError: adamx.host_offload_shardings: host-resident moments, but XLA:CPU in jaxlib "
        f"{jaxlib.__version__} keeps no array in pinned host memory inside a jitted step (they "
        "would silently move to device memory); host offload on CPU needs jaxlib >= 0.10.2")
    assert found["mixed"] == {name: {"zero1": True, "zero1+offload": offload}
                              for name in found["mixed"]} and len(found["mixed"]) == 4


def test_zero1_splits_8bit_blocks_with_their_scales_or_not_at_all(found):
    specs = found["int8"]["zero1_specs"]
    for moment in ("mu", "nu"):
        # 64 x 256: 8 rows, 8 whole blocks of 256 per device
        assert specs[f".{moment}['w'].codes"] == "P('data', None)"
        assert specs[f".{moment}['w'].absmax"] == "P('data',)"
        # 5000 x 3 in blocks of 256: a device's rows would cut blocks, so nothing splits
        assert specs[f".{moment}['odd'].codes"] == "P(None, None)"
        assert specs[f".{moment}['odd'].absmax"] == "P(None,)"
    assert found["int8"]["state_specs"] == specs
    sizes = found["int8"]["bytes_per_device"]
    assert sizes["['w'].codes"] == [64 * 256 // 8] * 8 and sizes["['w'].absmax"] == [4 * 8] * 8


def test_zero1_splits_rank1_codes_and_row_maxima_by_rows_and_keeps_column_maxima_whole(found):
    specs = found["int4"]["zero1_specs"]
    assert specs[".mu['w'].codes"] == "P('data', None)" and specs[".mu['w'].absmax"] == "P('data',)"
    assert specs[".nu['w'].codes"] == "P('data', None)"
    assert specs[".nu['w'].row_max"] == "P('data',)" and specs[".nu['w'].col_max"] == "P(None,)"
    sizes = found["int4"]["bytes_per_device"]
    assert sizes["['w'].codes"] == [64 * 128 // 8] * 8  # two codes per byte
    assert sizes["['w'].row_max"] == [4 * 8] * 8 and sizes["['w'].col_max"] == [4 * 256] * 8


def test_the_state_follows_row_sharded_params(found):
    for spec in ("int8", "int4"):
        specs = found[spec]["follow_specs"]
        assert specs[".mu['w'].codes"] == "P('data', None)"
        assert specs[".nu['w'].codes"] == "P('data', None)"
    assert found["int4"]["follow_specs"][".nu['w'].row_max"] == "P('data',)"


def test_decoding_needs_no_communication_and_rank1_encoding_one_column_all_reduce(found):
    assert found["blocks_decode_collectives"] == {} and found["blocks_encode_collectives"] == {}
    assert found["rank1_decode_collectives"] == {}
    # each step's column maxima over all rows: one all-reduce of 256 float32, nothing else
    assert found["rank1_encode_collectives"] == {"all-reduce": ["f32[256]"]}
