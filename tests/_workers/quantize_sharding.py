"""Quantized moments on 8 simulated CPU devices; prints its observations as one JSON line.

Started by tests/test_quantize_sharding.py with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adamx

STEPS = 4
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
              "odd": jnp.asarray(rng.normal(size=(5000, 3)), jnp.float32),  # blocks straddle shards
              "b": jnp.asarray(rng.normal(size=(256,)), jnp.float32)}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 0, v.shape),
                             jnp.float32) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def run(tx, params, grads, state_shardings=None):
    init = jax.jit(tx.init, out_shardings=state_shardings)
    step = jax.jit(tx.update, out_shardings=(None, state_shardings))
    state = init(params)
    for g in grads:
        updates, state = step(g, state, params)
    return updates, state


def spec(x):
    sharding = x.sharding if hasattr(x, "sharding") else x
    # "P" + the tuple: jax < 0.9 prints PartitionSpec(...), not P(...)
    return ("P" + repr(tuple(sharding.spec)) if isinstance(sharding, NamedSharding)
            else type(sharding).__name__)


def collectives(text):
    found = {}
    for name in COLLECTIVES:
        shapes = re.findall(rf"= (\w+\[[\d,]*\])\{{[^}}]*\}} {name}(?:-start)?\(", text)
        if shapes:
            found[name] = shapes
    return found


def equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def close(a, b):
    """Updates within float32 rounding, and all but a few state elements equal: compiled for
    explicitly sharded arrays, XLA:CPU may contract a multiply-add that it rounds twice on one
    device (one ulp), which now and then moves a stochastic rounding decision by one code."""
    updates = all(np.allclose(x, y, rtol=1e-4, atol=1e-7)
                  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])))
    def near(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.integer):
            return np.mean(x != y) < 0.01
        return np.allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-4, atol=1e-7)

    state = all(near(x, y) for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])))
    return bool(updates and state)


def main():
    out = {}
    params, grads = problem()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    for spec_name in ("int8", "int4"):
        tx = adamx.adam(1e-2, mu_dtype=spec_name, nu_dtype=spec_name)
        want = run(tx, params, grads)
        with jax.set_mesh(mesh):
            abstract = jax.eval_shape(tx.init, params)
            shardings = adamx.zero1_shardings(abstract, mesh)
            got = run(tx, params, grads, shardings)
        found = {"zero1_specs": {jax.tree_util.keystr(k): spec(v) for k, v in
                                 jax.tree_util.tree_flatten_with_path(shardings)[0]},
                 "state_specs": {jax.tree_util.keystr(k): spec(v) for k, v in
                                 jax.tree_util.tree_flatten_with_path(got[1])[0]},
                 "zero1_equal": equal(got, want)}
        # every array of each moment split alike, one eighth of its bytes per device
        found["bytes_per_device"] = {
            jax.tree_util.keystr(k): [int(s.data.nbytes) for s in v.addressable_shards]
            for k, v in jax.tree_util.tree_flatten_with_path(got[1].nu)[0]}
        # the state follows params sharded by rows (explicit axes: placed as the params are)
        explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
        with jax.set_mesh(explicit):
            place = {k: NamedSharding(explicit, P("data") if k != "odd" else P())
                     for k in params}
            sharded = run(tx, jax.device_put(params, place),
                          [jax.device_put(g, place) for g in grads])
        found["follow_specs"] = {jax.tree_util.keystr(k): spec(v) for k, v in
                                 jax.tree_util.tree_flatten_with_path(sharded[1])[0]}
        found["follow_equal"] = equal(sharded, want)
        out[spec_name] = found

    # mixed formats beside each other, and Kahan beside quantized moments: ZeRO-1 (with and without
    # host offload) over explicit mesh axes equals the single-device run
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    mixed = {"int8 mu, float32 nu": (jnp.float32, dict(mu_dtype="int8")),
             "float32 mu, int4 nu": (jnp.float32, dict(nu_dtype="int4")),
             "int4, bf16 params, kahan": (jnp.bfloat16, dict(mu_dtype="int4", nu_dtype="int4",
                                                             param_rounding="kahan")),
             "int8, bf16 params, stochastic": (jnp.bfloat16, dict(mu_dtype="int8", nu_dtype="int8",
                                                                  param_rounding="stochastic"))}
    out["mixed"] = {}
    for name, (dtype, options) in mixed.items():
        tx = adamx.adam(1e-2, **options)
        p16 = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), params)
        g16 = [jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), g) for g in grads]
        want = run(tx, p16, g16)
        found = {}
        with jax.set_mesh(explicit):
            zero1 = adamx.zero1_shardings(jax.eval_shape(tx.init, p16), explicit)
            for how in ("zero1", "zero1+offload"):
                try:
                    shardings = zero1 if how == "zero1" else adamx.host_offload_shardings(zero1)
                    found[how] = close(run(tx, p16, g16, shardings), want)
                except Exception as e:  # noqa: BLE001 - reported, and the test names it
                    found[how] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        out["mixed"][name] = found

    # rank-1: decoding a row-split moment needs no communication; encoding takes one all-reduce
    # (the columns' maxima over all rows) of the column count
    like = jax.eval_shape(lambda: adamx.quantize(jnp.ones((64, 256)), "int4", signed=False))
    rows = NamedSharding(mesh, P("data", None))
    zero1 = adamx.zero1_shardings(like, mesh)
    with jax.set_mesh(mesh):
        encode = jax.jit(lambda v: like.encode(v, None), in_shardings=rows, out_shardings=zero1)
        decode = jax.jit(lambda q: q.decode(), in_shardings=(zero1,), out_shardings=rows)
        out["rank1_encode_collectives"] = collectives(
            encode.lower(jax.ShapeDtypeStruct((64, 256), jnp.float32)).compile().as_text())
        out["rank1_decode_collectives"] = collectives(decode.lower(like).compile().as_text())
        blocks = jax.eval_shape(lambda: adamx.quantize(jnp.ones((64, 256)), "int8"))
        zero1 = adamx.zero1_shardings(blocks, mesh)
        decode = jax.jit(lambda q: q.decode(), in_shardings=(zero1,), out_shardings=rows)
        encode = jax.jit(lambda v: blocks.encode(v, None), in_shardings=rows,
                         out_shardings=zero1)
        out["blocks_decode_collectives"] = collectives(decode.lower(blocks).compile().as_text())
        out["blocks_encode_collectives"] = collectives(
            encode.lower(jax.ShapeDtypeStruct((64, 256), jnp.float32)).compile().as_text())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
