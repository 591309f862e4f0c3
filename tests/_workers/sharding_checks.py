"""Runs adamx's multi-device checks in one process and prints their findings as one JSON line.

Started by tests/test_sharding.py with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so
that JAX's start-up is paid once for all checks. Each check records observations (shardings as
strings, byte counts, differences); the test file makes the claims about them.
"""

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adamx
from adamx._quantize import dequantize, quantize

import mlp  # beside this script, so on sys.path when it runs

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
STEPS = 10
HLO_ITEMSIZE = {"f32": 4, "s32": 4, "u8": 1, "f64": 8, "bf16": 2, "f16": 2}


def spec_of(x):
    """The partition spec of an array or ShapeDtypeStruct, padded to its rank, as a string."""
    if isinstance(x, NamedSharding):
        return spec_str(x.spec)
    sharding = x.sharding
    if sharding is None:
        return "none"
    if not isinstance(sharding, NamedSharding):
        return type(sharding).__name__
    spec = list(sharding.spec) + [None] * (len(x.shape) - len(sharding.spec))
    return spec_str(P(*spec))


def spec_str(spec):
    """``P('data', None)`` on every jax (jax < 0.9 prints ``PartitionSpec('data', None)``)."""
    return "P" + repr(tuple(spec))


def specs(tree):
    return {jax.tree_util.keystr(k): spec_of(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def collectives(compiled_text):
    """How many instructions of each collective the compiled HLO holds."""
    return {name: len(re.findall(rf" {name}(?:-start)?\(", compiled_text)) for name in COLLECTIVES}


def all_gather_bytes(compiled_text):
    """Bytes of all the all-gather results in the compiled HLO."""
    total = 0
    for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(",
                                  compiled_text):
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        total += size * HLO_ITEMSIZE[dtype]
    return total


def sharded_params(mesh):
    """A params tree covering data/model-sharded, model-only, scalar and replicated odd leaves."""
    layout = {
        "w": ((16, 32), P("data", "model")),
        "b": ((32,), P("model")),
        "scale": ((), P()),
        "odd": ((3, 5), P()),
    }
    key = jax.random.key(0)
    params = {}
    for i, (name, (shape, spec)) in enumerate(layout.items()):
        value = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        params[name] = jax.device_put(value, NamedSharding(mesh, spec))
    return params


def follow_check(axis_type, steps=STEPS):
    """init (jit, eager, eval_shape) and ``steps`` jitted updates on a ("data", "model") mesh."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    out = {}
    with jax.set_mesh(mesh):
        params = sharded_params(mesh)
        out["params"] = specs(params)
        jit_state = jax.jit(adamx.init)(params)
        out["jit_init"] = specs(jit_state)
        out["jit_init_count_replicated"] = jit_state.count.sharding.is_fully_replicated
        out["jit_init_count_devices"] = len(jit_state.count.sharding.device_set)
        eager_state = adamx.init(params)
        out["eager_init"] = specs(eager_state)
        out["eager_init_count_devices"] = len(eager_state.count.sharding.device_set)
        out["amsgrad_jit_init"] = specs(jax.jit(lambda p: adamx.init(p, amsgrad=True))(params))
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in params.items()}
        planned = jax.eval_shape(adamx.init, abstract)
        out["eval_shape"] = specs(planned)
        out["eval_shape_shapes"] = {jax.tree_util.keystr(k): [list(v.shape), str(v.dtype)]
                                    for k, v in jax.tree_util.tree_flatten_with_path(planned)[0]}
        tx = adamx.adam(1e-2)

        def step(params, state):
            grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + p, params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        if not steps:
            return out
        jitted = jax.jit(step)
        out["update_hlo_collectives"] = collectives(
            jitted.lower(params, jit_state).compile().as_text())
        state = jit_state
        for _ in range(steps):
            params, state = jitted(params, state)
        out["after_updates"] = specs(state)
        out["params_after_updates"] = specs(params)
        out["count_after_updates"] = int(state.count)
    return out


def mlp_params(mesh):
    """Zero params of the 64-128-10 MLP's shapes, replicated over ``mesh``."""
    shapes = jax.eval_shape(lambda: mlp.init_mlp(jax.random.key(0)))
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                          NamedSharding(mesh, P()))


def zero1_state(mesh):
    """``(params, a ZeRO-1 Adam state of them, its shardings)``; call under ``jax.set_mesh``."""
    params = mlp_params(mesh)
    shardings = adamx.zero1_shardings(jax.eval_shape(adamx.init, params), mesh)
    return params, jax.jit(adamx.init, out_shardings=shardings)(params), shardings


def zero1_bytes_check():
    """Per-device bytes of the MLP's Adam state under ZeRO-1 for N = 1, 2, 4, 8."""
    out = {}
    for n in (1, 2, 4, 8):
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        with jax.set_mesh(mesh):
            params, state, _ = zero1_state(mesh)
            per_device = {}
            for leaf in jax.tree.leaves(state):
                for shard in leaf.addressable_shards:
                    per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + \
                        shard.data.nbytes
            # What the documented rule predicts: leaves with a dimension N divides split N ways.
            predicted = sum(
                leaf.nbytes // n if any(d % n == 0 for d in leaf.shape) else leaf.nbytes
                for leaf in jax.tree.leaves(state))
            out[str(n)] = {
                "per_device": sorted(per_device.values()),
                "total": sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
                "predicted": predicted,
                "specs": specs(state),
                "params_specs": specs(params),
            }
    return out


def max_abs_diff(a, b):
    return float(max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def equality_check():
    """10 ZeRO-1 data-parallel steps on 8 devices vs one device (optax, and adamx itself).

    Plain data parallelism (replicated state) is checked over two processes by
    tests/test_multiprocess.py.
    """
    x, y = mlp.synthetic_data()
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    eight = jax.make_mesh((8,), ("data",))
    optimizers = {
        "adam": (lambda: adamx.adam(1e-2), lambda: optax.adam(1e-2), (True,)),
        "adamw": (lambda: adamx.adamw(1e-2, weight_decay=0.1),
                  lambda: optax.adamw(1e-2, weight_decay=0.1), (True,)),
    }
    initial = jax.device_get(mlp.init_mlp(jax.random.key(0)))
    out = {}
    for name, (ours, peer, zero1_modes) in optimizers.items():
        with jax.set_mesh(one):
            oracle = mlp.train(peer(), one, x, y, steps=STEPS)
            single = mlp.train(ours(), one, x, y, steps=STEPS)
        out[f"{name}_one_device"] = {"vs_optax": max_abs_diff(single, oracle)}
        for zero1 in zero1_modes:
            with jax.set_mesh(eight):
                got = mlp.train(ours(), eight, x, y, steps=STEPS, zero1=zero1)
            out[f"{name}{'_zero1' if zero1 else ''}"] = {
                "vs_optax": max_abs_diff(got, oracle),
                "vs_one_device": max_abs_diff(got, single),
                "max_param_change": max_abs_diff(oracle, initial),
            }
    return out


def zero1_hlo_check():
    """Collectives in the ZeRO-1 update: the updates of split leaves must be all-gathered."""
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        params, state, shardings = zero1_state(mesh)
        tx = adamx.adam(1e-3)

        def step(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        replicated = NamedSharding(mesh, P())
        jitted = jax.jit(step, out_shardings=(replicated, shardings))
        text = jitted.lower(params, state, params).compile().as_text()
        split = [p.nbytes for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings.mu))
                 if "data" in str(s.spec)]
        return {"collectives": collectives(text), "all_gather_bytes": all_gather_bytes(text),
                "split_param_bytes": sum(split)}


def quantized_zero1_check(axis_type):
    """ZeRO-1 shardings of 8-bit moments: split with whole blocks, decoded with no collective."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    moments = {
        "aligned": quantize(jax.random.normal(jax.random.key(1), (64, 128)), "int8"),
        "short_rows": quantize(jax.random.normal(jax.random.key(2), (3, 1000)), "int8"),
        "int4_rank1": quantize(jnp.abs(jax.random.normal(jax.random.key(3), (64, 128))), "int4",
                               signed=False),
    }
    out = {}
    with jax.set_mesh(mesh):
        shardings = adamx.zero1_shardings(moments, mesh)
        for name, moment in moments.items():
            placed = jax.device_put(moment, shardings[name])
            try:
                decoded = dequantize(placed)
            except ValueError as error:  # a decode that the sharding-in-types mode rejects
                out[name] = {"specs": specs(shardings[name]), "error": str(error)}
                continue
            per_device = {}
            for leaf in jax.tree.leaves(placed):
                for shard in leaf.addressable_shards:
                    per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
            out[name] = {
                "specs": specs(shardings[name]),
                "per_device": max(per_device.values()),
                "total": sum(leaf.nbytes for leaf in jax.tree.leaves(moment)),
                "decode_equal": bool(np.array_equal(decoded, dequantize(moment))),
                "decode_hlo_collectives": collectives(jax.jit(dequantize).lower(placed)
                                                      .compile().as_text()),
            }
    return out


def int8_check(axis_type, bits="int8"):
    """If init takes quantized moments: 10 ZeRO-1 steps on 8 devices vs the same run on one device."""
    try:
        adamx.init({"w": jnp.zeros((64, 128))}, mu_dtype=bits, nu_dtype=bits)
    except (ValueError, TypeError) as error:
        return {"available": False, "reason": str(error)}
    x, y = mlp.synthetic_data()
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(axis_type,))
    eight = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))

    def tx():
        return adamx.adam(1e-2, mu_dtype=bits, nu_dtype=bits)

    with jax.set_mesh(one):
        single = mlp.train(tx(), one, x, y, steps=STEPS)
    with jax.set_mesh(eight):
        try:
            sharded = mlp.train(tx(), eight, x, y, steps=STEPS, zero1=True)
        except ValueError as error:  # a step that the sharding-in-types mode rejects
            return {"available": True, "error": str(error)}
        state = jax.eval_shape(tx().init, mlp_params(eight))
        shardings = specs(adamx.zero1_shardings(state, eight))
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(sharded), jax.tree.leaves(single))])
    return {"available": True, "vs_one_device": max_abs_diff(sharded, single),
            "diff_quantiles": [float(q) for q in np.quantile(diffs, [0.5, 0.99, 0.999])],
            "elements": int(diffs.size),
            "max_param_change": max_abs_diff(single, jax.device_get(mlp.init_mlp(jax.random.key(0)))),
            "specs": shardings}


def rounding_check(rounding):
    """bfloat16 params with stochastic or Kahan rounding: ZeRO-1 on 8 devices (the compensation
    split like the moments) vs one device, and the same with the state offloaded to the host."""
    x, y = mlp.synthetic_data()
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(AxisType.Auto,))
    eight = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

    def tx():
        return adamx.adam(1e-2, param_rounding=rounding)

    with jax.set_mesh(one):
        single = mlp.train(tx(), one, x, y, steps=STEPS, dtype=jnp.bfloat16)
    with jax.set_mesh(eight):
        sharded, state = mlp.train(tx(), eight, x, y, steps=STEPS, zero1=True, dtype=jnp.bfloat16,
                                   keep_state=True)
        if adamx._sharding.jit_keeps_pinned_host("cpu"):
            offloaded, host_state = mlp.train(tx(), eight, x, y, steps=STEPS, zero1=True,
                                              dtype=jnp.bfloat16, offload=True, keep_state=True)
            offload_error = None
        else:
            try:
                adamx.host_offload_shardings(adamx.zero1_shardings(state, eight))
                offload_error = "no error"
            except ValueError as error:
                offload_error = str(error)
    pairs = list(zip(jax.tree.leaves(sharded), jax.tree.leaves(single)))
    equal = sum(int(np.sum(np.asarray(a, np.float32) == np.asarray(b, np.float32))) for a, b in pairs)
    # differences in bfloat16 ulps of each leaf's largest param (its coarsest rounding step)
    ulps = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)) /
            (2.0**-8 * np.max(np.abs(np.asarray(b, np.float32)))) for a, b in pairs]
    found = {"equal_fraction": equal / sum(a.size for a, _ in pairs),
             "max_leaf_ulps": float(max(np.max(u) for u in ulps)),
             "offload_error": offload_error,
             "max_param_change": max_abs_diff(single, jax.device_get(jax.tree.map(
                 lambda p: p.astype(jnp.bfloat16), mlp.init_mlp(jax.random.key(0)))))}
    if offload_error is None:
        found["offload_equal"] = all(
            np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
            for a, b in zip(jax.tree.leaves(offloaded), jax.tree.leaves(sharded)))
        found["offload_kinds"] = sorted({x.sharding.memory_kind for x in jax.tree.leaves(
            (host_state.mu, host_state.nu, host_state.compensation))})
    if rounding == "kahan":
        found["compensation_specs"] = specs(state.compensation)
    return found


def main():
    assert jax.device_count() == 8, jax.devices()
    checks = {
        "explicit": lambda: follow_check(AxisType.Explicit),
        "auto": lambda: follow_check(AxisType.Auto, steps=0),
        "zero1_bytes": zero1_bytes_check,
        "zero1_hlo_collectives": zero1_hlo_check,
        "equality": equality_check,
        "quantized_zero1_auto": lambda: quantized_zero1_check(AxisType.Auto),
        "quantized_zero1_explicit": lambda: quantized_zero1_check(AxisType.Explicit),
        "int8_auto": lambda: int8_check(AxisType.Auto),
        "int4_auto": lambda: int8_check(AxisType.Auto, "int4"),
        "stochastic": lambda: rounding_check("stochastic"),
        "kahan": lambda: rounding_check("kahan"),
    }
    findings, seconds = {}, {}
    for name, check in checks.items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        start = time.perf_counter()
        findings[name] = check()
        seconds[name] = round(time.perf_counter() - start, 2)
    findings["seconds"] = seconds
    print(json.dumps(findings))


if __name__ == "__main__":
    main()
