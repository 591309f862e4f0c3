"""Adam step time: adamx vs optax.adam vs torch.optim.Adam, side by side in one run.

Each JAX step is one jitted function (update + ``optax.apply_updates``, or ``adamx.apply`` for the
fused path) with params and state donated (``--no-donate``: not). Paths: ``adamx`` is
``adamx.adam`` through the Optax protocol as a user gets it (plain JAX on every backend),
``adamx-fused`` is ``adamx.apply(..., fused=True)``, the opt-in CPU kernel built at install time.
Each torch step is ``optimizer.step()`` with the grads already in place. Times are medians of
``--repeats`` runs after warm-up (``block_until_ready``).

Effective GB/s counts 28 bytes per float32 parameter (read p, g, m, v; write p, m, v), the least
traffic any Adam step can move. The floor is this machine's measured in-place bandwidth in the same
run: ``a += b`` over 16M float32 (12 bytes per element moved), with NumPy (one thread) and with
torch (its intra-op threads); the faster of the two is the floor, and "% floor" is the step's
effective GB/s over it. The paths of a tree run interleaved (one step of each per round, in a
shuffled order), so a change of load on a shared machine hits all of them alike; the ratios are
the numbers to read. "peak RSS" is the process's peak after building that path (cumulative over
the run). "in-loop ms/step" times ``--inner`` JAX steps inside one jitted ``fori_loop`` (as a
training loop under ``lax.scan`` runs them), which leaves out the per-call cost of passing every
buffer.

Then, per memory mode of adamx (moment storage, 16-bit params and their rounding; ``--modes``), in
the same run: the optimizer step on one 4096x4096 leaf, with XLA's bytes accessed and the mode's
floor in bytes per parameter and the compiled step's fusions; a whole training step of an MLP; and
the compile time of the optimizer step on a nanoGPT-shaped tree; each as a ratio to float32
``adamx.adam`` (see ``_modes.py``; these steps are always donated). A row that adamx does not
support prints "unsupported" and the first line of its error.

Usage::

    python benchmarks/step_time.py                      # everything (tree (b) compiles longest)
    python benchmarks/step_time.py --quick              # a smoke run: small shapes, few repeats
    python benchmarks/step_time.py --trees a --paths adamx,optax,torch-fused --repeats 15
    python benchmarks/step_time.py --trees "" --no-keras --modes float32,int8,bf16-stochastic
    python benchmarks/step_time.py --json results.json --no-keras --no-modes
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import _modes  # benchmarks/, the script's own folder, is first on sys.path

BYTES_PER_PARAM = 28
JAX_PATHS = ("adamx", "adamx-fused", "optax")
TORCH_PATHS = ("torch-loop", "torch-foreach", "torch-fused")
ALL_PATHS = JAX_PATHS + TORCH_PATHS
TREES = ("a", "b", "c")
TREE_NAMES = {
    "a": "(a) one leaf, 16M",
    "b": "(b) 1,000 leaves, 256-8,192",
    "c": "(c) MLP 784-1024-1024-1024-10",
}
LR = 1e-3
FLOOR_ELEMENTS = 16 * 2**20
FLOOR_BYTES = 12 * FLOOR_ELEMENTS  # read a, read b, write a


def make_tree(name, seed=0):
    """The params and grads of a benchmark tree, as dicts of float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    if name == "a":
        shapes = {"w": (16 * 2**20,)}
    elif name == "b":
        sizes = rng.integers(256, 8192, size=1000, endpoint=True)
        shapes = {f"leaf{i:04d}": (int(n),) for i, n in enumerate(sizes)}
    elif name == "c":
        widths = [784, 1024, 1024, 1024, 10]
        shapes = {}
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            shapes[f"dense{i}/kernel"] = (n_in, n_out)
            shapes[f"dense{i}/bias"] = (n_out,)
    else:
        raise ValueError(f"unknown tree {name!r}")
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    return params, grads


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fns, repeats, warmup):
    """Median and all wall times (ms) of each ``fns[k]()``, which must block until done.

    The calls are interleaved (one of each per round, in a seeded random order), so that a change
    in the machine's load during the run affects every path alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        # A fresh order every round: a path timed right after a torch call shares the cores with
        # torch's still-spinning OpenMP threads, and in a rotated fixed order the same path would
        # always follow the same torch call (it cost the path after the floor's torch call 1.3x).
        for k in rng.permutation(list(fns)):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(t), t) for k, t in times.items()}


def floor_calls():
    """In-place ``a += b`` over 16M float32 with NumPy (one thread) and torch (its threads)."""
    n = FLOOR_ELEMENTS
    a = np.ones(n, np.float32)
    b = np.ones(n, np.float32)
    fns = {"floor:numpy": lambda: np.add(a, b, out=a)}
    try:
        import torch
    except ImportError:
        return fns
    ta = torch.ones(n)
    tb = torch.ones(n)
    fns["floor:torch"] = lambda: ta.add_(tb)
    return fns


def jax_step(path):
    """The step function of a JAX path: (params, state, grads) -> (params, state)."""
    import adamx
    import optax

    if path == "adamx-fused":
        def step(params, state, grads):
            return adamx.apply(grads, state, params, learning_rate=LR, fused=True)

        return adamx.init, step
    if path == "optax":
        opt = optax.adam(LR)
    elif path == "adamx":
        opt = adamx.adam(LR)
    else:
        raise ValueError(path)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt.init, step


def fresh(tree):
    """A copy of ``tree`` in new device buffers, through NumPy.

    Not ``jnp.copy``: an eager op compiles once per distinct shape, and those compiles finish in
    the background while the timed calls run (1,000 shapes in tree (b) held a core for seconds,
    and the path built first paid for it).
    """
    import jax

    return jax.device_put(jax.tree.map(np.array, tree))


def bench_jax(path, tree, inner, donate=True):
    """One JAX path on one tree.

    Returns:
      (a blocking call of one step, its lower+compile seconds, a blocking call of ``inner``
      steps inside one jitted ``fori_loop`` or None when ``inner`` is 0).
    """
    import jax

    init, step = jax_step(path)
    params_np, grads_np = make_tree(tree)
    params = jax.device_put(params_np)
    grads = jax.device_put(grads_np)
    state = jax.jit(init)(params)
    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    carry = [params, state]

    def call():
        carry[0], carry[1] = compiled(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    if not inner:
        return call, compile_s, None

    def steps(params, state, grads):
        return jax.lax.fori_loop(0, inner, lambda _, c: step(*c, grads), (params, state))

    looped = jax.jit(steps, donate_argnums=(0, 1)).lower(*carry, grads).compile()
    loop_carry = [fresh(params_like) for params_like in carry]

    def loop_call():
        loop_carry[0], loop_carry[1] = looped(loop_carry[0], loop_carry[1], grads)
        jax.block_until_ready(loop_carry)

    return call, compile_s, loop_call


def bench_torch(path, tree, inner, donate=True):
    """One ``torch.optim.Adam`` variant on one tree: returns (its step, None, None)."""
    del inner, donate  # torch updates in place
    import torch

    params_np, grads_np = make_tree(tree)
    params = [torch.tensor(p, requires_grad=True) for p in params_np.values()]
    for p, g in zip(params, grads_np.values()):
        p.grad = torch.tensor(g)
    options = {
        "torch-loop": {"foreach": False},
        "torch-foreach": {"foreach": True},
        "torch-fused": {"fused": True},
    }[path]
    opt = torch.optim.Adam(params, lr=LR, **options)
    return opt.step, None, None


def available(path):
    """Why ``path`` cannot run here, or None when it can."""
    module = "torch" if path.startswith("torch") else "adamx" if path.startswith("adamx") else "optax"
    try:
        __import__(module)
    except ImportError as e:
        return f"{module} not importable ({e})"
    if path == "adamx-fused":
        from adamx import _native

        ok, why = _native.status()
        if not ok:
            return f"fused kernel unavailable ({why})"
    return None


def run_steps(trees, paths, repeats, warmup, inner, donate=True):
    """All (tree, path) step timings, plus the bandwidth floor, as one result dict."""
    results = {"floor_method": "a += b over 16M float32 (12 B/element), NumPy 1 thread and "
                               "torch's threads, timed interleaved with each tree's paths; "
                               "floor = the faster", "trees": {}}
    try:
        import torch

        results["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for tree in trees:
        n_params = sum(p.size for p in make_tree(tree)[0].values())
        entry = {"n_params": int(n_params), "paths": {}}
        calls = floor_calls()
        for path in paths:
            why = available(path)
            if why is not None:
                entry["paths"][path] = {"skipped": why}
                continue
            bench = bench_torch if path in TORCH_PATHS else bench_jax
            try:
                calls[path], compile_s, loop_call = bench(path, tree, inner, donate)
            except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
                entry["paths"][path] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
                continue
            if loop_call is not None:
                calls[f"loop:{path}"] = loop_call
            entry["paths"][path] = {"compile_s": compile_s, "peak_rss_mb": peak_rss_mb()}
            print(f"  {tree} {path}: built", file=sys.stderr, flush=True)
        timed = time_calls(calls, repeats, warmup)
        floors = {k.split(":")[1]: FLOOR_BYTES / timed.pop(k)[0] / 1e6
                  for k in list(timed) if k.startswith("floor:")}
        entry["floor_gbps"] = floors
        floor = max(floors.values())
        for k in [k for k in timed if k.startswith("loop:")]:
            entry["paths"][k.split(":", 1)[1]]["in_loop_ms"] = timed.pop(k)[0] / inner
        for path, (med, times) in timed.items():
            r = entry["paths"][path]
            r.update(median_ms=med, times_ms=times)
            r["gbps"] = BYTES_PER_PARAM * n_params / med / 1e6
            r["pct_floor"] = 100 * r["gbps"] / floor
        del calls
        for r in entry["paths"].values():
            for ref in ("adamx", "optax", "torch-fused"):
                base = entry["paths"].get(ref, {}).get("median_ms")
                if "median_ms" in r and base:
                    r[f"x_{ref}"] = r["median_ms"] / base
            base = entry["paths"].get("optax", {}).get("compile_s")
            if r.get("compile_s") and base:
                r["compile_x_optax"] = r["compile_s"] / base
        results["trees"][tree] = entry
    return results


def print_steps(results):
    """Prints the step-time tables as Markdown."""
    if not results["trees"]:
        return
    print(f"Bandwidth floor: {results['floor_method']}")
    for tree, entry in results["trees"].items():
        floors = entry["floor_gbps"]
        floor = max(floors.values())
        floor_ms = BYTES_PER_PARAM * entry["n_params"] / floor / 1e6
        measured = ", ".join(f"{k} {v:.1f} GB/s" for k, v in floors.items())
        print(f"\n{TREE_NAMES[tree]}: {entry['n_params']:,} params; floor {measured}; "
              f"floor time at 28 B/param {floor_ms:.2f} ms")
        print("| path | median ms | GB/s | % floor | x adamx | x optax | x torch-fused "
              "| in-loop ms/step | compile s | compile x optax | peak RSS MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for path, r in entry["paths"].items():
            if "skipped" in r:
                print(f"| {path} | skipped: {r['skipped']} |||||||||")
                continue

            def ratio(key, r=r):
                return f"{r[key]:.2f}" if key in r else "-"

            comp = f"{r['compile_s']:.2f}" if r["compile_s"] is not None else "-"
            loop = f"{r['in_loop_ms']:.2f}" if "in_loop_ms" in r else "-"
            print(f"| {path} | {r['median_ms']:.2f} | {r['gbps']:.1f} | {r['pct_floor']:.0f} "
                  f"| {ratio('x_adamx')} | {ratio('x_optax')} | {ratio('x_torch-fused')} "
                  f"| {loop} | {comp} | {ratio('compile_x_optax')} | {r['peak_rss_mb']:.0f} |")


def keras_epoch_times(data, learning_rate, epochs, batch_size):
    """Per-epoch wall times of ``keras.Model.fit`` (JAX backend) on the example's model and data."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras is on the {keras.backend.backend()} backend, not jax")
    keras.utils.set_random_seed(0)
    outputs = data.num_classes
    model = keras.Sequential(
        [keras.Input((data.x_train.shape[1],))]
        + [keras.layers.Dense(w, activation="relu") for w in data.hidden]
        + [keras.layers.Dense(outputs, activation="sigmoid" if outputs == 1 else None)])
    loss = ("binary_crossentropy" if outputs == 1
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.tic = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.tic)

    model.fit(data.x_train, data.y_train, batch_size=batch_size, epochs=epochs, verbose=0,
              validation_data=(data.x_test, data.y_test), callbacks=[Timer()])
    return times


def run_training(epochs):
    """Per-epoch wall time: the Flax example vs ``keras.Model.fit`` on the same task."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import flax_mlp
        from _common import DEFAULT_LEARNING_RATES, load_task
    except ImportError as e:
        return {"skipped": f"examples/flax_mlp.py not importable ({e})"}
    out = flax_mlp.main(["--task", "seed", "--quiet", "--epochs", str(epochs)])
    steady = out["epoch_times"][1:] or out["epoch_times"]
    result = {"flax example (adamx)": {"median_epoch_s": statistics.median(steady),
                                       "compile_s": out.get("compile_s")}}
    try:
        times = keras_epoch_times(load_task("seed"), DEFAULT_LEARNING_RATES["adam"], epochs, 32)
    except (ImportError, RuntimeError) as e:
        result["keras.Model.fit"] = {"skipped": str(e)}
    else:
        # Keras compiles inside its first epoch, so its median is over the epochs after it.
        result["keras.Model.fit"] = {"median_epoch_s": statistics.median(times[1:] or times),
                                     "compile_s": times[0] - statistics.median(times[1:] or times)}
    return result


def print_training(result, epochs):
    """Prints the training table as Markdown."""
    print(f"\nKeras example (--task seed), {epochs} epochs, batch 32: wall time per epoch")
    if "skipped" in result:
        print(f"skipped: {result['skipped']}")
        return
    print("| trainer | median ms/epoch | compile s |")
    print("|---|---:|---:|")
    for name, r in result.items():
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | |")
            continue
        comp = f"{r['compile_s']:.2f}" if r.get("compile_s") is not None else "-"
        print(f"| {name} | {r['median_epoch_s'] * 1e3:.1f} ms | {comp} |")


QUICK = {"trees": "a,c", "repeats": 3, "warmup": 1, "inner": 0, "compile_repeats": 1, "no_keras": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", default=",".join(TREES), help="comma list of a,b,c (may be empty)")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help="comma list of paths")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs (median of these)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--inner", type=int, default=10,
                        help="also time JAX steps inside one jitted fori_loop of this many steps "
                             "(no per-call dispatch of every buffer); 0 to skip")
    parser.add_argument("--epochs", type=int, default=50, help="epochs for the training table")
    parser.add_argument("--no-donate", action="store_true",
                        help="jit the trees' JAX steps without donating params and state (the "
                             "memory modes' steps are always donated)")
    parser.add_argument("--no-keras", action="store_true", help="skip the training table")
    parser.add_argument("--modes", default=",".join(_modes.MODE_KEYS),
                        help="comma list of memory modes (float32, the baseline, is always in): "
                             + ", ".join(_modes.MODE_KEYS))
    parser.add_argument("--compile-repeats", type=int, default=3,
                        help="compiles of each mode's step on the nanoGPT tree (median of these)")
    parser.add_argument("--no-modes", action="store_true", help="skip the memory-mode tables")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run, its numbers not for reading: trees a and c, 3 repeats, "
                             "no fori_loop or Keras, small shapes for the modes (flags given "
                             "still win)")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    trees = [t for t in args.trees.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    modes = {"float32"} | {m for m in args.modes.split(",") if m}
    for given, known, what in ((trees, TREES, "tree"), (paths, ALL_PATHS, "path"),
                               (modes, _modes.MODE_KEYS, "mode")):
        for x in given:
            if x not in known:
                parser.error(f"unknown {what} {x!r}; choose from {', '.join(known)}")
    import jax

    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or platform.machine()}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    results = run_steps(trees, paths, args.repeats, args.warmup, args.inner,
                        donate=not args.no_donate)
    print_steps(results)
    if not args.no_modes:
        results["modes"] = _modes.run_modes(modes, args.repeats, args.warmup, args.compile_repeats,
                                            time_calls, quick=args.quick)
        _modes.print_modes(results["modes"])
    if not args.no_keras:
        results["training"] = run_training(args.epochs)
        print_training(results["training"], args.epochs)
    results["peak_rss_mb"] = peak_rss_mb()
    print(f"\npeak RSS of the whole run: {results['peak_rss_mb']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
