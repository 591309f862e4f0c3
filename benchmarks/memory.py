"""Bytes, quality and update time of each way to hold Adam's params and state in less memory.

One row per mode: the params' dtype and how they take their step (``param_rounding``), and the
moments' storage (``mu_dtype`` / ``nu_dtype``). The bf16-param rows keep float32 moments unless
they say otherwise, so that they differ from the float32 row by the params alone.

Three tables, all from one run:

1. Bytes per parameter of params and optimizer state together, counted from the arrays
   (``jax.eval_shape``, nothing allocated): on a GPT-2-small-shaped tree (6 layers, 82M params)
   and on each quality problem's own tree (where small leaves, kept float32, weigh more).
2. Quality: held-out loss after the same steps on the same batches, relative to the float32 row
   (float32 params and moments, 12 bytes/param), on four problems: a 64-256-1 tanh
   teacher-student regression (the problem of issue 13, on which rounding the second moment to
   nearest cost +5%), an MLP on sklearn's digits, noisy least squares, and a character-level MLP
   language model on the Python standard library's own ``.py`` files (found through
   ``sysconfig``; no download). Each problem runs ``--seeds`` data orders (the regression at least
   4); a row shows the mean change over them and its range, and the float32 row the seeds' own
   spread around their mean.
3. Optimizer time: the update and ``optax.apply_updates`` jitted together, params and state
   donated (a training step without its model), on one 16M-element leaf, 1-D and 4096 x 4096
   (where a 4-bit second moment takes rank-1 normalization), each mode timed in interleaved
   rounds so a change of load hits every mode alike; medians, and the ratio to float32.

Usage::

    python benchmarks/memory.py                                   # everything (~30 min, 2 cores)
    python benchmarks/memory.py --problems regression --skip-time # one problem
    python benchmarks/memory.py --plot docs/memory_quality.png    # and the loss curves
    python benchmarks/memory.py --steps-scale 0.25 --seeds 1      # a quick look
"""

import argparse
import math
import pathlib
import statistics
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

F32, BF16 = jnp.float32, jnp.bfloat16
# name: (param dtype, param_rounding, moment storage for mu and nu)
MODES = {
    "float32": (F32, "nearest", F32),
    "f32 + bf16 moments": (F32, "nearest", BF16),
    "f32 + int8 moments": (F32, "nearest", "int8"),
    "f32 + int4 moments": (F32, "nearest", "int4"),
    "bf16 nearest": (BF16, "nearest", F32),
    "bf16 stochastic": (BF16, "stochastic", F32),
    "bf16 kahan": (BF16, "kahan", F32),
    "bf16 stochastic + int8": (BF16, "stochastic", "int8"),
    "bf16 stochastic + int4": (BF16, "stochastic", "int4"),
}


def make_tx(mode, lr):
    """The mode's optimizer, or None if this adamx does not offer it (e.g. no param_rounding)."""
    _, rounding, moments = MODES[mode]
    kwargs = {} if rounding == "nearest" else {"param_rounding": rounding}
    try:
        return adamx.adam(lr, mu_dtype=moments, nu_dtype=moments, **kwargs)
    except (TypeError, ValueError) as e:
        print(f"  ({mode}: unsupported here: {e})")
        return None


def nbytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bytes_per_param(mode, params):
    """Bytes of params and optimizer state together per parameter, or None if unsupported."""
    dtype = MODES[mode][0]
    tx = make_tx(mode, 1e-3)
    if tx is None:
        return None
    cast = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)
    size = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    return (nbytes(cast) + nbytes(jax.eval_shape(tx.init, cast))) / size


# ---- 1. bytes per parameter --------------------------------------------------------------------

def gpt2_shapes(layers=6, width=768, vocab=50257, context=1024):
    shapes = {"wte": (vocab, width), "wpe": (context, width), "ln_f": (2, width)}
    for i in range(layers):
        shapes |= {f"h{i}.attn.qkv": (width, 3 * width), f"h{i}.attn.qkv_b": (3 * width,),
                   f"h{i}.attn.proj": (width, width), f"h{i}.attn.proj_b": (width,),
                   f"h{i}.mlp.fc": (width, 4 * width), f"h{i}.mlp.fc_b": (4 * width,),
                   f"h{i}.mlp.proj": (4 * width, width), f"h{i}.mlp.proj_b": (width,),
                   f"h{i}.ln_1": (2, width), f"h{i}.ln_2": (2, width)}
    return {k: jax.ShapeDtypeStruct(v, F32) for k, v in shapes.items()}


# ---- 2. quality problems -----------------------------------------------------------------------

def dense_init(rng, sizes):
    return {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2 / a), F32)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))} | {
            f"b{i}": jnp.zeros(b, F32) for i, b in enumerate(sizes[1:])}


def mlp(params, x, layers, act=jax.nn.relu):
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        x = act(x) if i < layers - 1 else x
    return x


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def regression_problem(steps, train=8192, test=4096, width=64, hidden=256, batch=256):
    """A 64-256-1 tanh student fitting a random 64-256-1 tanh teacher (no noise), Adam lr 3e-4."""
    rng = np.random.default_rng(0)
    teacher = {"w0": rng.normal(size=(width, hidden)) / np.sqrt(width),
               "b0": 0.2 * rng.normal(size=hidden),
               "w1": rng.normal(size=(hidden, 1)) / np.sqrt(hidden), "b1": np.zeros(1)}
    x = rng.normal(size=(train + test, width))
    y = jnp.asarray(mlp(teacher, x, 2, np.tanh), F32)
    x = jnp.asarray(x, F32)
    student = np.random.default_rng(1)
    params = {"w0": jnp.asarray(student.normal(size=(width, hidden)) / np.sqrt(width), F32),
              "b0": jnp.zeros(hidden, F32),
              "w1": jnp.asarray(student.normal(size=(hidden, 1)) / np.sqrt(hidden), F32),
              "b1": jnp.zeros(1, F32)}

    def loss(params, batch):
        return jnp.mean((mlp(params, batch[0], 2, jnp.tanh) - batch[1]) ** 2)

    def batches(seed):
        order = np.random.default_rng(100 + seed)
        per_epoch, perm = train // batch, None
        for step in range(steps):
            if step % per_epoch == 0:
                perm = order.permutation(train)
            idx = perm[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
            yield x[idx], y[idx]

    return dict(name=f"teacher-student tanh {width}-{hidden}-1, batch {batch}", params=params,
                loss=loss, batches=batches, lr=3e-4, steps=steps, min_seeds=4,
                final=lambda p: float(loss(p, (x[train:], y[train:]))),
                final_name=f"held-out MSE ({test} points)")


def digits_problem(steps):
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = jnp.asarray(data.data / 16.0, F32), jnp.asarray(data.target, jnp.int32)
    params = dense_init(np.random.default_rng(0), [64, 256, 256, 10])

    def loss(params, batch):
        return cross_entropy(mlp(params, batch[0], 3), batch[1])

    def batches(seed):
        for step in range(steps):
            idx = np.random.default_rng(step + 7919 * seed).integers(0, 1500, 128)
            yield x[idx], y[idx]

    # the MLP memorizes the 1,500 training digits (train loss ~0.004), so compare held-out loss
    return dict(name="digits MLP 64-256-256-10, batch 128", params=params, loss=loss,
                batches=batches, lr=1e-3, steps=steps, min_seeds=1,
                final=lambda p: float(loss(p, (x[1500:], y[1500:]))),
                final_name="held-out cross-entropy (297 digits)")


def least_squares_problem(steps):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2048, 512)).astype(np.float32)
    y = (x @ rng.normal(size=(512, 128)) + 0.5 * rng.normal(size=(2048, 128))).astype(np.float32)
    ones = np.hstack([x, np.ones((2048, 1), np.float32)]).astype(np.float64)
    optimum = np.mean((ones @ np.linalg.lstsq(ones, y, rcond=None)[0] - y) ** 2)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = {"w": jnp.zeros((512, 128), F32), "b": jnp.zeros(128, F32)}

    def loss(params, batch):
        del batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    def batches(seed):
        del seed  # full batch: every seed is the same run
        for _ in range(steps):
            yield None

    return dict(name="least squares 2048x512 -> 128, noise 0.5, full batch", params=params,
                loss=loss, batches=batches, lr=5e-2, steps=steps, min_seeds=1, max_seeds=1,
                final=lambda p: float(loss(p, None)),
                final_name=f"mean squared error (optimum {optimum:.5g})")


def stdlib_text(limit=1_500_000):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total >= limit:
            break
    # ASCII only (128 symbols): non-ASCII characters become "?"
    return np.frombuffer("".join(parts)[:limit].encode("ascii", "replace"), np.uint8)


def char_lm_problem(steps, context=32, embed=24, hidden=512):
    text = stdlib_text()
    split = int(0.9 * text.size)
    train, held_out = jnp.asarray(text[:split], jnp.int32), jnp.asarray(text[split:], jnp.int32)
    rng = np.random.default_rng(2)
    params = dense_init(rng, [context * embed, hidden, hidden, 128])
    params["embed"] = jnp.asarray(rng.normal(size=(128, embed)), F32)

    def loss(params, windows):
        x = params["embed"][windows[:, :-1]].reshape(windows.shape[0], -1)
        return cross_entropy(mlp(params, x, 3), windows[:, -1])

    def windows(source, starts):
        return source[starts[:, None] + np.arange(context + 1)]

    eval_windows = windows(held_out, np.random.default_rng(3).integers(
        0, held_out.size - context - 1, 8192))

    def batches(seed):
        for step in range(steps):
            starts = np.random.default_rng(step + 7919 * seed).integers(0, split - context - 1, 256)
            yield windows(train, starts)

    return dict(name=f"char MLP LM on {text.size / 1e6:.1f}M chars of the stdlib, context "
                     f"{context}, batch 256", params=params, loss=loss, batches=batches, lr=2e-3,
                steps=steps, min_seeds=1,
                final=lambda p: float(jax.jit(loss)(p, eval_windows)),
                final_name="held-out cross-entropy (nats/char)")


PROBLEMS = {"regression": (regression_problem, 3000), "digits": (digits_problem, 400),
            "least-squares": (least_squares_problem, 400), "char-lm": (char_lm_problem, 800)}


def train_lockstep(problem, modes, seed):
    """One copy per mode on the same batches, one step of each per round: losses and finals."""
    steps, carry = {}, {}
    for mode in modes:
        dtype = MODES[mode][0]
        tx = make_tx(mode, problem["lr"])
        if tx is None:
            continue

        def step(params, state, batch, tx=tx):
            loss, grads = jax.value_and_grad(problem["loss"])(params, batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params = jax.tree.map(lambda p, dtype=dtype: jnp.array(p, dtype, copy=True), problem["params"])
        steps[mode] = jax.jit(step, donate_argnums=(0, 1))
        carry[mode] = (params, tx.init(params))
    losses = {mode: [] for mode in steps}
    for batch in problem["batches"](seed):
        for mode, step in steps.items():
            params, state, loss = step(*carry[mode], batch)
            carry[mode] = (params, state)
            losses[mode].append(loss)
    finals = {mode: problem["final"](jax.tree.map(lambda p: p.astype(F32), carry[mode][0]))
              for mode in steps}
    return {mode: np.asarray(jnp.stack(v), np.float64) for mode, v in losses.items()}, finals


def quality(problem, modes, seeds):
    """Per mode: the list of finals over seeds; and the first seed's loss curves."""
    seeds = max(seeds, problem["min_seeds"])
    seeds = min(seeds, problem.get("max_seeds", seeds))
    finals, curves = {}, None
    for seed in range(seeds):
        start = time.perf_counter()
        losses, found = train_lockstep(problem, modes, seed)
        curves = curves or losses
        for mode, value in found.items():
            finals.setdefault(mode, []).append(value)
        print(f"  {problem['name'].split(',')[0]}: seed {seed} done in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return finals, curves


def change_cell(values, base):
    """Mean relative change over seeds (paired with the float32 run of the same seed), its range."""
    rel = np.asarray(values) / np.asarray(base) - 1
    if rel.size == 1:
        return f"{rel[0]:+.2%}"
    return f"{rel.mean():+.2%} ({rel.min():+.2%} .. {rel.max():+.2%})"


def spread_cell(base):
    rel = np.asarray(base) / np.mean(base) - 1
    if rel.size == 1:
        return f"{base[0]:.5g}"
    return f"{np.mean(base):.5g} (seeds {rel.min():+.2%} .. {rel.max():+.2%})"


# ---- 3. update time ----------------------------------------------------------------------------

def update_times(modes, shape, rounds=9):
    """Median seconds of one optimizer step on one leaf of ``shape``, per mode: the update and
    ``optax.apply_updates``, jitted together with params and state donated (as a training step
    runs them; the update alone would mostly time allocating its output)."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=shape).astype(np.float32)
    runs = {}
    for mode in modes:
        dtype = MODES[mode][0]
        tx = make_tx(mode, 1e-3)
        if tx is None:
            continue
        params = {"w": jnp.asarray(base, dtype)}
        grads = {"w": jnp.asarray(1e-3 * base, dtype)}
        def step(g, state, params, tx=tx):
            updates, state = tx.update(g, state, params)
            return state, optax.apply_updates(params, updates)

        step = jax.jit(step, donate_argnums=(1, 2))
        carry = jax.block_until_ready(step(grads, tx.init(params), params))
        runs[mode] = [step, carry, [], grads]
    for _ in range(rounds):
        for run in runs.values():
            start = time.perf_counter()
            run[1] = jax.block_until_ready(run[0](run[3], *run[1]))
            run[2].append(time.perf_counter() - start)
    return {mode: statistics.median(run[2]) for mode, run in runs.items()}


# ---- output --------------------------------------------------------------------------------------

def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), squeeze=False)
    for ax, (problem, _, curves) in zip(axes[0], results):
        window = 50 if problem["steps"] > 1000 else 25
        for mode, curve in curves.items():
            smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(smooth.size) + window, smooth, label=mode, lw=1.0)
        ax.set_yscale("log")
        ax.set_title(problem["name"].split(",")[0], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss ({window}-step mean)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("adamx.adam: params and moments in float32, bfloat16, 8 and 4 bits (seed 0)")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", help="write the loss curves to this PNG")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count")
    parser.add_argument("--seeds", type=int, default=1,
                        help="data orders per problem (the regression runs at least 4)")
    parser.add_argument("--problems", default=",".join(PROBLEMS),
                        help=f"comma-separated, from {','.join(PROBLEMS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated mode names")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "float32" not in modes:
        parser.error(f"--modes must include float32 and name only {list(MODES)}, got {modes}")
    print(f"jax {jax.__version__}, adamx {adamx.__version__}, device {jax.devices()[0]}")

    scale = lambda n: max(20, int(n * args.steps_scale))  # noqa: E731
    names = [name for name in args.problems.split(",") if name]
    if any(name not in PROBLEMS for name in names):
        parser.error(f"--problems must name only {list(PROBLEMS)}, got {names}")
    problems = [PROBLEMS[name][0](scale(PROBLEMS[name][1])) for name in names]
    print("\n## Bytes per parameter, params and optimizer state together\n")
    trees = [("GPT-2-small-shaped tree, 82M", gpt2_shapes())] + [
        (p["name"].split(",")[0], p["params"]) for p in problems]
    print("| mode | " + " | ".join(name for name, _ in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for mode in modes:
        cells = [bytes_per_param(mode, tree) for _, tree in trees]
        print(f"| {mode} | " + " | ".join("unsupported" if c is None else f"{c:.3f}"
                                          for c in cells) + " |")

    results = [(p, *quality(p, modes, args.seeds)) for p in problems]
    if results:
        quality_table(results, modes)
    if not args.skip_time:
        time_table(modes)
    if args.plot and results:
        plot(results, args.plot)


def quality_table(results, modes):
    print("\n## Held-out quality: change against float32 params and moments, same steps and "
          "batches (mean over seeds, and range)\n")
    print("| mode | " + " | ".join(f"{p['name'].split(',')[0]} ({p['steps']} steps, "
                                    f"{len(finals['float32'])} seed{'s' * (len(finals['float32']) > 1)})"
                                    for p, finals, _ in results) + " |")
    print("|---|" + "---|" * len(results))
    for mode in modes:
        cells = []
        for _, finals, _ in results:
            if mode not in finals:
                cells.append("unsupported")
            elif mode == "float32":
                cells.append(spread_cell(finals[mode]))
            else:
                cells.append(change_cell(finals[mode], finals["float32"]))
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\nMetrics: " + "; ".join(f"{p['name'].split(',')[0]}: {p['final_name']}"
                                     for p, _, _ in results))


def time_table(modes):
    print("\n## Step time without a model (update + apply_updates, jitted, params and state "
          "donated; medians of interleaved rounds)\n")
    shapes = [(16 * 2**20,), (4096, 4096)]
    timed = [update_times(modes, shape) for shape in shapes]
    print("| mode | " + " | ".join(f"one {'x'.join(map(str, s))} leaf" for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for mode in modes:
        cells = []
        for medians in timed:
            if mode not in medians:
                cells.append("unsupported")
            else:
                ratio = medians[mode] / medians["float32"]
                cells.append(f"{medians[mode] * 1e3:.1f} ms ({ratio:.2f}x)")
        print(f"| {mode} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
