"""The memory-mode tables of ``step_time.py``: what each mode of adamx costs against float32.

Three measurements per memory mode (moment storage, 16-bit params and their rounding), each as a
ratio to the float32 ``adamx.adam`` step:

1. the optimizer step on one 4096x4096 leaf (update + ``optax.apply_updates``, jitted, params and
   state donated), with what XLA says the compiled step reads and writes (``cost_analysis()``'s
   "bytes accessed") beside the least any step of that mode can move (read and write the params
   and the state, read the grads, counted from the arrays' own nbytes), and the number of fusions
   in the compiled step;
2. a whole training step of an MLP at batch 64 (value_and_grad, update, apply_updates: one jitted,
   donated call), also as a ratio to ``optax.adam`` on params of the same dtype (for bfloat16
   params, the same bfloat16 model: its own casts are not the optimizer's);
3. the trace+lower+compile time of the optimizer step on a nanoGPT-shaped tree (53 leaves).

1 and 2 are timed together, every row of both once per round in a shuffled order; 3 in its own
rounds. Every mode also gets an ``adamx.apply(..., fused=True)`` row (the opt-in CPU kernel) in
1 and 2; a row that adamx does not support prints "unsupported" and the first line of its error.
"""

import re
import sys

import numpy as np

LR = 1e-3
# (key for --modes, name, param dtype, keyword arguments of adamx.adam); the first is the baseline.
MEMORY_MODES = (
    ("float32", "float32 moments", "float32", {}),
    ("bf16-moments", "mu/nu bfloat16", "float32", {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"}),
    ("int8", "mu/nu int8", "float32", {"mu_dtype": "int8", "nu_dtype": "int8"}),
    ("int4", "mu/nu int4", "float32", {"mu_dtype": "int4", "nu_dtype": "int4"}),
    ("bf16-nearest", "bf16 params, nearest", "bfloat16", {"param_rounding": "nearest"}),
    ("bf16-stochastic", "bf16 params, stochastic", "bfloat16", {"param_rounding": "stochastic"}),
    ("bf16-kahan", "bf16 params, kahan", "bfloat16", {"param_rounding": "kahan"}),
    ("bf16-stochastic-int8", "bf16 params, stochastic, int8", "bfloat16",
     {"param_rounding": "stochastic", "mu_dtype": "int8", "nu_dtype": "int8"}),
    ("bf16-stochastic-int4", "bf16 params, stochastic, int4", "bfloat16",
     {"param_rounding": "stochastic", "mu_dtype": "int4", "nu_dtype": "int4"}),
)
MODE_KEYS = tuple(m[0] for m in MEMORY_MODES)
# 2-D, so that int4's second moment takes its rank-1 format, as on a weight matrix (a 1-D leaf
# falls back to 8 bits).
LEAF_SHAPE = (4096, 4096)
MLP_WIDTHS = (1024, 2048, 2048, 1024)
BATCH = 64
GPT_LAYERS = 4
STEPS = {"adamx": "adamx.adam", "fused": "apply(fused=True)", "optax": "optax.adam"}


def mode_kwargs(kwargs):
    """adamx keyword arguments with dtype names turned into dtypes ("int8"/"int4" stay specs)."""
    import jax.numpy as jnp

    return {k: jnp.dtype(v) if k.endswith("_dtype") and v not in ("int8", "int4") else v
            for k, v in kwargs.items()}


def optimizer(step, kwargs):
    """``(init, apply)`` of one row: ``apply(grads, state, params) -> (params, state)``.

    ``step`` is "adamx" (``adamx.adam(**kwargs)`` through the Optax protocol), "optax"
    (``optax.adam``, ``kwargs`` empty) or "fused" (:func:`fused_optimizer`).
    """
    import optax

    if step == "fused":
        return fused_optimizer(kwargs)
    if step == "optax":
        opt = optax.adam(LR, **kwargs)
    else:
        import adamx

        opt = adamx.adam(LR, **mode_kwargs(kwargs))

    def apply(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt.init, apply


def fused_optimizer(kwargs):
    """``adamx.init(**kwargs)`` and ``adamx.apply(fused=True)``, which takes the mode's options
    but the moments' storage (``mu_dtype``, ``nu_dtype``): the state built by init carries that."""
    import adamx

    kwargs = mode_kwargs(kwargs)
    step_kwargs = {k: v for k, v in kwargs.items() if k not in ("mu_dtype", "nu_dtype")}

    def init(params):
        return adamx.init(params, **kwargs)

    def apply(grads, state, params):
        return adamx.apply(grads, state, params, learning_rate=LR, fused=True, **step_kwargs)

    return init, apply


def first_line(e):
    """The type and first line of an exception, for a table cell."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def entry_ops(hlo_text):
    """Counts in the entry computation of an HLO module's text: its fusions, those of them with
    an array output (not a scalar), and its custom calls (the fused kernel)."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        return {}
    entry = hlo_text[start:hlo_text.find("\n}", start)]
    out_types = re.findall(r"= (.+?) fusion\(", entry)
    return {"fusions": len(out_types),
            "array_fusions": sum(not re.fullmatch(r"\w+\[\]", t) for t in out_types),
            "custom_calls": len(re.findall(r" custom-call\(", entry))}


def bytes_accessed(compiled):
    """XLA's "bytes accessed" of a compiled step (``cost_analysis()`` is a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return (cost or {}).get("bytes accessed")


def nbytes(tree):
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def floor_terms(params, state, grads, n):
    """Bytes per parameter that any step must move: read+write params and state, read grads.

    Returns:
      (the floor, how it was derived as text), from the arrays' nbytes, per state field.
    """
    import jax

    fields = {"p": nbytes(params) / n}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        field = getattr(path[0], "name", str(path[0]))  # the state's field: count, mu, nu, ...
        fields[field] = fields.get(field, 0) + leaf.nbytes / n
    grads_b = nbytes(grads) / n
    floor = 2 * sum(fields.values()) + grads_b
    held = " + ".join(f"{k} {v:.2f}" for k, v in fields.items())
    return floor, f"2 x ({held}) + g {grads_b:.2f} = {floor:.2f}"


def compile_donated(apply_like, *args):
    """``jax.jit(apply_like, donate_argnums=(0, 1))`` lowered and compiled for ``args``."""
    import jax

    return jax.jit(apply_like, donate_argnums=(0, 1)).lower(*args).compile()


def blocking_call(compiled, carry, *rest):
    """A call of ``compiled(*carry, *rest)`` that carries its first two outputs and blocks."""
    import jax

    def call():
        out = compiled(*carry, *rest)
        carry[0], carry[1] = out[0], out[1]
        jax.block_until_ready(out)

    return call


def leaf_row(step, param_dtype, kwargs, data):
    """The optimizer step of one row on the leaf ``data`` (float32 NumPy params and grads).

    Returns:
      (a blocking call of one step, the row's entry). Raises whatever the step raises for a mode
      it does not support, at init, trace, compile or the first call.
    """
    import jax

    init, apply = optimizer(step, kwargs)
    dtype = np.dtype(jax.numpy.dtype(param_dtype))
    params = {"w": jax.device_put(data[0].astype(dtype))}
    grads = {"w": jax.device_put(data[1].astype(dtype))}
    state = jax.jit(init)(params)
    n = data[0].size
    floor, derivation = floor_terms(params, state, grads, n)
    compiled = compile_donated(lambda p, s, g: apply(g, s, p), params, state, grads)
    ops = entry_ops(compiled.as_text())
    # XLA counts nothing inside a custom call, so its bytes accessed would be a part only.
    xla_bytes = None if ops.get("custom_calls") else bytes_accessed(compiled)
    call = blocking_call(compiled, [params, state], grads)
    call()
    return call, {"state_bytes_per_param": nbytes(state) / n, "floor_bytes_per_param": floor,
                  "floor_derivation": derivation, **ops,
                  "xla_bytes_per_param": xla_bytes / n if xla_bytes is not None else None}


def mlp_loss(params, x, y):
    """Mean squared error of a ReLU MLP (its matmuls in the params' dtype, the mean in float32)."""
    import jax
    import jax.numpy as jnp

    h = x
    for i, layer in enumerate(params):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return jnp.mean(jnp.square(h.astype(jnp.float32) - y.astype(jnp.float32)))


def mlp_data(widths, batch, seed=0):
    """He-initialized float32 NumPy params of an MLP, and one random batch (x, y)."""
    rng = np.random.default_rng(seed)
    params = [{"kernel": rng.standard_normal((n_in, n_out), dtype=np.float32) * np.sqrt(2 / n_in),
               "bias": np.zeros(n_out, np.float32)} for n_in, n_out in zip(widths[:-1], widths[1:])]
    x = rng.standard_normal((batch, widths[0]), dtype=np.float32)
    y = rng.standard_normal((batch, widths[-1]), dtype=np.float32)
    return params, x, y


def train_row(step, param_dtype, kwargs, data):
    """A whole training step of one row on the MLP ``data``; returns a blocking call of it."""
    import jax

    init, apply = optimizer(step, kwargs)
    dtype = np.dtype(jax.numpy.dtype(param_dtype))
    params_np, x, y = data
    params = jax.device_put(jax.tree.map(lambda a: a.astype(dtype), params_np))
    x, y = jax.device_put((x.astype(dtype), y.astype(dtype)))
    state = jax.jit(init)(params)

    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        params, state = apply(grads, state, params)
        return params, state, loss

    call = blocking_call(compile_donated(train_step, params, state, x, y), [params, state], x, y)
    call()
    return call


def gpt_shapes(layers, vocab=65, block=256, width=128):
    """The param shapes of a small character-level GPT (nanoGPT's layout): 12 leaves a layer and
    5 more (embeddings, final layer norm, head); 53 for 4 layers."""
    shapes = {"wte": (vocab, width), "wpe": (block, width)}
    for i in range(layers):
        for name, shape in {"ln_1/scale": (width,), "ln_1/bias": (width,),
                            "attn/c_attn/kernel": (width, 3 * width), "attn/c_attn/bias": (3 * width,),
                            "attn/c_proj/kernel": (width, width), "attn/c_proj/bias": (width,),
                            "ln_2/scale": (width,), "ln_2/bias": (width,),
                            "mlp/c_fc/kernel": (width, 4 * width), "mlp/c_fc/bias": (4 * width,),
                            "mlp/c_proj/kernel": (4 * width, width), "mlp/c_proj/bias": (width,)}.items():
            shapes[f"h{i}/{name}"] = shape
    shapes.update({"ln_f/scale": (width,), "ln_f/bias": (width,), "lm_head": (width, vocab)})
    return shapes


def compile_row(step, param_dtype, kwargs, layers):
    """A call that traces, lowers and compiles the optimizer step afresh on the nanoGPT tree.

    Only traced here, so that a mode that cannot run fails now and costs no compile.
    """
    import jax

    init, apply = optimizer(step, kwargs)
    dtype = jax.numpy.dtype(param_dtype)
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in gpt_shapes(layers).items()}
    state = jax.eval_shape(init, params)

    def call():
        # A new function each time, so that none of jax's caches answers from an earlier compile.
        def step_fn(params, state, grads):
            return apply(grads, state, params)

        compile_donated(step_fn, params, state, params)

    jax.jit(lambda p, s, g: apply(g, s, p)).trace(params, state, params)
    return call


def rows(modes, steps):
    """(row key, mode, step) of each row: ``steps`` of each mode, optax's rows first."""
    out = []
    if "optax" in steps:
        dtypes = dict.fromkeys(m[2] for m in MEMORY_MODES if m[0] in modes)
        out += [(f"optax/{d}", ("optax", f"optax.adam, {d} params", d, {}), "optax") for d in dtypes]
    out += [(f"{m[0]}/{s}", m, s) for m in MEMORY_MODES if m[0] in modes for s in steps if s != "optax"]
    return out


def build(table, builder, row_list, data=None):
    """Builds each row of a table: (its calls by row key, its entries by row key)."""
    calls, entries = {}, {}
    for key, (mode, name, param_dtype, kwargs), step in row_list:
        entry = {"mode": mode, "name": name, "params": param_dtype, "kwargs": kwargs, "step": step}
        try:
            args = (step, param_dtype, kwargs) + ((data,) if data is not None else ())
            built = builder(*args)
        except Exception as e:  # noqa: BLE001 - modes are being built; report, don't crash
            entry["unsupported"] = first_line(e)
        else:
            if isinstance(built, tuple):
                built, more = built
                entry.update(more)
            calls[f"{table}:{key}"] = built
        entries[key] = entry
        print(f"  {table} {key}: {'unsupported' if 'unsupported' in entry else 'built'}",
              file=sys.stderr, flush=True)
    return calls, entries


def add_times(entries, table, timed):
    """Puts each row's median (ms) and its ratios into its entry."""
    for key, entry in entries.items():
        if f"{table}:{key}" in timed:
            med, times = timed[f"{table}:{key}"]
            entry.update(median_ms=med, times_ms=times)
    base = entries.get("float32/adamx", {}).get("median_ms")
    for entry in entries.values():
        if "median_ms" not in entry:
            continue
        if base:
            entry["x_float32"] = entry["median_ms"] / base
        same = entries.get(f"optax/{entry['params']}", {}).get("median_ms")
        if same and entry["step"] != "optax":
            entry["x_optax_same_params"] = entry["median_ms"] / same


def run_modes(modes, repeats, warmup, compile_repeats, time_calls, quick=False):
    """The three mode tables. ``time_calls`` is step_time's interleaved timer.

    The leaf steps and training steps of every mode are timed in one interleaved run (one call of
    each per round, in a shuffled order); the compiles in a second one, ``compile_repeats`` rounds.
    """
    shape = (512, 512) if quick else LEAF_SHAPE
    widths = (256, 512, 512, 256) if quick else MLP_WIDTHS
    layers = 1 if quick else GPT_LAYERS
    rng = np.random.default_rng(0)
    leaf = tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    leaf_calls, leaf_rows = build("leaf", leaf_row, rows(modes, ("adamx", "fused")), leaf)
    train_calls, train_rows = build("train", train_row, rows(modes, ("optax", "adamx", "fused")),
                                    mlp_data(widths, BATCH))
    timed = time_calls({**leaf_calls, **train_calls}, repeats, warmup)
    del leaf_calls, train_calls, leaf
    add_times(leaf_rows, "leaf", timed)
    add_times(train_rows, "train", timed)
    # No warm-up: the builds above have already traced and compiled each mode's code once.
    compile_calls, compile_rows = build("compile", compile_row, rows(modes, ("adamx",)), layers)
    add_times(compile_rows, "compile", time_calls(compile_calls, compile_repeats, 0))
    shapes = gpt_shapes(layers)
    return {"leaf": {"shape": list(shape), "rows": leaf_rows},
            "train": {"widths": list(widths), "batch": BATCH, "rows": train_rows},
            "compile": {"layers": layers, "leaves": len(shapes), "repeats": compile_repeats,
                        "n_params": sum(int(np.prod(s)) for s in shapes.values()),
                        "rows": compile_rows}}


def cell(entry, key, fmt="{:.2f}", scale=1):
    return fmt.format(entry[key] * scale) if entry.get(key) is not None else "-"


def print_table(header, entries, columns):
    """Prints Markdown rows: mode, step, params, then ``columns(entry)`` (or "unsupported")."""
    print("| mode | step | params | " + " | ".join(header) + " |")
    print("|---|---|---|" + "---:|" * len(header))
    for entry in entries.values():
        head = f"| {entry['name']} | {STEPS[entry['step']]} | {entry['params']} |"
        if "unsupported" in entry:
            print(f"{head} unsupported: {entry['unsupported']} |" + " |" * (len(header) - 1))
        else:
            print(f"{head} " + " | ".join(columns(entry)) + " |")


def leaf_columns(r):
    xla, floor = r.get("xla_bytes_per_param"), r["floor_bytes_per_param"]
    ops = f"{r['fusions']} ({r['array_fusions']})" if "fusions" in r else "-"
    if r.get("custom_calls"):
        ops += f" + {r['custom_calls']} custom call"
    return [cell(r, "x_float32"), cell(r, "median_ms"), cell(r, "state_bytes_per_param"),
            cell(r, "xla_bytes_per_param", "{:.1f}"), f"{floor:.1f}",
            f"{xla / floor:.2f}" if xla else "-", ops]


def print_modes(results):
    """Prints the three mode tables, and how each mode's floor was counted, as Markdown."""
    leaf, train, comp = results["leaf"], results["train"], results["compile"]
    shape = "x".join(map(str, leaf["shape"]))
    print(f"\n(1) Optimizer step on one {shape} leaf ({np.prod(leaf['shape']):,} params; update + "
          "apply_updates, jitted, donated), timed interleaved with (2). x float32: ratio to the "
          "float32 adamx.adam step. XLA B/param: cost_analysis()'s bytes accessed (not counted "
          "inside a custom call: -); floor: the least the mode's step can move (below); fusions "
          "in the compiled step's entry computation (those with an array output)")
    print_table(("x float32", "median ms", "state B/param", "XLA B/param", "floor B/param",
                 "XLA / floor", "fusions (on arrays)"), leaf["rows"], leaf_columns)
    print("\nFloor in bytes per parameter, from the arrays' nbytes: read and write the params (p) "
          "and each state field, read the grads (g):")
    for entry in leaf["rows"].values():
        if entry["step"] == "adamx" and "floor_derivation" in entry:
            print(f"- {entry['name']}: {entry['floor_derivation']}")
    widths = "-".join(map(str, train["widths"]))
    print(f"\n(2) Training step, MLP {widths} (ReLU, MSE on random data), batch {train['batch']}: "
          "value_and_grad + update + apply_updates, one jitted, donated call. x float32: ratio to "
          "float32 adamx.adam; x optax.adam: to optax.adam on params of the same dtype (the same "
          "model)")
    print_table(("x float32", "x optax.adam, same params", "median ms"), train["rows"], lambda r: [
        cell(r, "x_float32"), cell(r, "x_optax_same_params"), cell(r, "median_ms")])
    print(f"\n(3) Compile time (trace, lower, compile) of the optimizer step on a nanoGPT-shaped "
          f"tree ({comp['layers']}-layer, {comp['leaves']} leaves, {comp['n_params']:,} params), "
          f"median of {comp['repeats']} interleaved compiles. x float32: ratio to float32 adamx.adam")
    print_table(("x float32", "median s"), comp["rows"], lambda r: [
        cell(r, "x_float32"), cell(r, "median_ms", scale=1e-3)])
