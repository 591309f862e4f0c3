"""Memory, quality and step time of Adam's moments in float32, bfloat16 and block-wise int8.

Three tables, all from one run:

1. State bytes per parameter of ``adamx.adam`` on a GPT-2-small-shaped tree (6 layers, 82M
   params), counted from the arrays of the state (``jax.eval_shape``, nothing allocated), and
   the device memory in use after allocating each state where JAX reports it
   (``jax.devices()[0].memory_stats()``; JAX's CPU backend reports none).
2. Quality: the same number of steps of ``adamx.adam`` with each moment storage, on the same
   batches, on three problems: an MLP on sklearn's digits, noisy least squares, and a
   character-level MLP language model trained on the Python standard library's own ``.py``
   files (found through ``sysconfig``; no download, so the text depends on the Python version).
   The modes train in lockstep, one step of each per round.
3. Step time of each mode relative to float32: the jitted training steps of table 2, timed after
   training in 15 interleaved rounds of 10 steps of each mode (so a change of load hits every
   mode alike; medians of the rounds), and the optimizer update alone on one 16M-element leaf,
   where the encode/decode cost is most visible.

Usage::

    python benchmarks/memory.py                                  # all tables (~4 min, 2 cores)
    python benchmarks/memory.py --plot docs/memory_quality.png   # and the loss curves
    python benchmarks/memory.py --steps-scale 0.25               # a quick look
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

MODES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": "int8"}


def nbytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---- 1. bytes per parameter --------------------------------------------------------------------

def gpt2_shapes(layers=6, width=768, vocab=50257, context=1024):
    shapes = {"wte": (vocab, width), "wpe": (context, width), "ln_f": (2, width)}
    for i in range(layers):
        shapes |= {f"h{i}.attn.qkv": (width, 3 * width), f"h{i}.attn.qkv_b": (3 * width,),
                   f"h{i}.attn.proj": (width, width), f"h{i}.attn.proj_b": (width,),
                   f"h{i}.mlp.fc": (width, 4 * width), f"h{i}.mlp.fc_b": (4 * width,),
                   f"h{i}.mlp.proj": (4 * width, width), f"h{i}.mlp.proj_b": (width,),
                   f"h{i}.ln_1": (2, width), f"h{i}.ln_2": (2, width)}
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def memory_table():
    params = gpt2_shapes()
    size = sum(math.prod(p.shape) for p in params.values())
    small = sum(math.prod(p.shape) for p in params.values() if math.prod(p.shape) < 4096)
    print(f"\n## State bytes per parameter: GPT-2-small-shaped tree, 6 layers, {size / 1e6:.1f}M "
          f"params ({small / size:.2%} of them in leaves under 4,096 elements, kept float32)\n")
    device = jax.devices()[0]
    print("| moments | state bytes | bytes / param | device bytes in use / param |")
    print("|---|---|---|---|")
    for mode, dtype in MODES.items():
        tx = adamx.adam(1e-3, mu_dtype=dtype, nu_dtype=dtype)
        shapes = jax.eval_shape(tx.init, params)
        measured = "n/a"
        if device.memory_stats() is not None:
            before = device.memory_stats()["bytes_in_use"]
            init = jax.jit(lambda tx=tx: tx.init(
                jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)))
            state = jax.block_until_ready(init())
            measured = f"{(device.memory_stats()['bytes_in_use'] - before) / size:.3f}"
            del state
        print(f"| {mode} | {nbytes(shapes):,} | {nbytes(shapes) / size:.3f} | {measured} |")
    if device.memory_stats() is None:
        print(f"\n(device bytes: `{device.platform}` reports no memory_stats(), so only the count "
              "from the state's arrays is shown)")


# ---- 2. quality problems -----------------------------------------------------------------------

def dense_init(rng, sizes):
    return {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2 / a), jnp.float32)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))} | {
            f"b{i}": jnp.zeros(b, jnp.float32) for i, b in enumerate(sizes[1:])}


def mlp(params, x, layers):
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        x = jax.nn.relu(x) if i < layers - 1 else x
    return x


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def digits_problem(steps):
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = jnp.asarray(data.data / 16.0, jnp.float32), jnp.asarray(data.target, jnp.int32)
    params = dense_init(np.random.default_rng(0), [64, 256, 256, 10])

    def loss(params, batch):
        return cross_entropy(mlp(params, batch[0], 3), batch[1])

    def batch(step):
        idx = np.random.default_rng(step).integers(0, 1500, 128)
        return x[idx], y[idx]

    # the MLP memorizes the 1,500 training digits (train loss ~0.004), so compare held-out loss
    return dict(name="digits MLP 64-256-256-10, batch 128", params=params, loss=loss, batch=batch,
                lr=1e-3, steps=steps, final=lambda p: float(loss(p, (x[1500:], y[1500:]))),
                final_name="held-out cross-entropy (297 digits)")


def least_squares_problem(steps):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2048, 512)).astype(np.float32)
    y = (x @ rng.normal(size=(512, 128)) + 0.5 * rng.normal(size=(2048, 128))).astype(np.float32)
    ones = np.hstack([x, np.ones((2048, 1), np.float32)]).astype(np.float64)
    optimum = np.mean((ones @ np.linalg.lstsq(ones, y, rcond=None)[0] - y) ** 2)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = {"w": jnp.zeros((512, 128), jnp.float32), "b": jnp.zeros(128, jnp.float32)}

    def loss(params, batch):
        del batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    return dict(name="least squares 2048x512 -> 128, noise 0.5, full batch", params=params,
                loss=loss, batch=lambda step: None, lr=5e-2, steps=steps,
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
    params["embed"] = jnp.asarray(rng.normal(size=(128, embed)), jnp.float32)

    def loss(params, windows):
        x = params["embed"][windows[:, :-1]].reshape(windows.shape[0], -1)
        return cross_entropy(mlp(params, x, 3), windows[:, -1])

    def windows(source, starts):
        return source[starts[:, None] + np.arange(context + 1)]

    eval_starts = np.random.default_rng(3).integers(0, held_out.size - context - 1, 8192)
    eval_windows = windows(held_out, eval_starts)

    def batch(step):
        return windows(train, np.random.default_rng(step).integers(0, split - context - 1, 256))

    return dict(name=f"char MLP LM on {text.size / 1e6:.1f}M chars of the stdlib, context "
                     f"{context}, batch 256", params=params, loss=loss, batch=batch, lr=2e-3,
                steps=steps, final=lambda p: float(jax.jit(loss)(p, eval_windows)),
                final_name="held-out cross-entropy (nats/char)")


def train_lockstep(problem):
    """Trains one copy per mode, one step of each per round; returns losses, finals, step times."""
    steps, carry = {}, {}
    for mode, dtype in MODES.items():
        tx = adamx.adam(problem["lr"], mu_dtype=dtype, nu_dtype=dtype)

        def step(params, state, batch, tx=tx):
            loss, grads = jax.value_and_grad(problem["loss"])(params, batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        steps[mode] = jax.jit(step)
        carry[mode] = (problem["params"], tx.init(problem["params"]))
    losses = {mode: [] for mode in MODES}
    for i in range(problem["steps"]):
        batch = problem["batch"](i)
        for mode, step in steps.items():
            params, state, loss = step(*carry[mode], batch)
            carry[mode] = (params, state)
            losses[mode].append(loss)
    finals = {mode: problem["final"](carry[mode][0]) for mode in MODES}
    times = time_lockstep(steps, carry, problem["batch"](0))
    return {mode: np.asarray(jnp.stack(v)) for mode, v in losses.items()}, finals, times


def time_lockstep(steps, carry, batch, rounds=15, per_round=10):
    """Median seconds per step of each mode, over rounds of ``per_round`` steps of every mode."""
    times = {mode: [] for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            params, state = carry[mode]
            for _ in range(per_round):
                params, state, _ = step(params, state, batch)
            carry[mode] = jax.block_until_ready((params, state))
            times[mode].append((time.perf_counter() - start) / per_round)
    return {mode: statistics.median(t) for mode, t in times.items()}


def update_only_times(size=16 * 2**20, rounds=7):
    """Median time of the optimizer update alone (no model) on one leaf of ``size`` elements."""
    params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=size), jnp.float32)}
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    runs = {}
    for mode, dtype in MODES.items():
        tx = adamx.adam(1e-3, mu_dtype=dtype, nu_dtype=dtype)
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p), donate_argnums=1)
        state = jax.block_until_ready(step(grads, tx.init(params), params)[1])
        runs[mode] = [step, state, []]
    for _ in range(rounds):
        for run in runs.values():
            start = time.perf_counter()
            run[1] = jax.block_until_ready(run[0](grads, run[1], params)[1])
            run[2].append(time.perf_counter() - start)
    return {mode: statistics.median(run[2]) for mode, run in runs.items()}


def smooth(values, window):
    return np.convolve(values, np.ones(window) / window, mode="valid") if window > 1 else values


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for ax, (problem, losses, _, _) in zip(axes, results):
        window = 1 if problem["batch"](0) is None else 25
        for mode, curve in losses.items():
            ax.plot(np.arange(curve.size - window + 1) + window, smooth(curve, window),
                    label=mode, lw=1.2)
        ax.set_yscale("log")
        ax.set_title(problem["name"].split(",")[0], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss" + (f" ({window}-step mean)" if window > 1 else ""))
        ax.legend()
    fig.suptitle("adamx.adam with float32, bfloat16 and int8 moments: same steps, same batches")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", help="write the loss curves to this PNG")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, adamx {adamx.__version__}, device {jax.devices()[0]}")
    if not args.skip_memory:
        memory_table()

    scale = lambda n: max(20, int(n * args.steps_scale))  # noqa: E731
    problems = [digits_problem(scale(400)), least_squares_problem(scale(400)),
                char_lm_problem(scale(800))]
    results = [(p, *train_lockstep(p)) for p in problems]

    print("\n## Quality: final loss after the same steps on the same batches\n")
    print("| problem | steps | metric | float32 | bfloat16 | int8 | bfloat16 vs f32 | int8 vs f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for problem, _, finals, _ in results:
        f32 = finals["float32"]
        print(f"| {problem['name']} | {problem['steps']} | {problem['final_name']} | {f32:.5g} | "
              f"{finals['bfloat16']:.5g} | {finals['int8']:.5g} | "
              f"{finals['bfloat16'] / f32 - 1:+.2%} | {finals['int8'] / f32 - 1:+.2%} |")

    print("\n## Step time relative to float32 moments (medians, interleaved in one run)\n")
    print("| step | float32 | bfloat16 | int8 |")
    print("|---|---|---|---|")
    for problem, _, _, medians in results:
        f32 = medians["float32"]
        print(f"| train step: {problem['name'].split(',')[0]} | 1.00 ({f32 * 1e3:.2f} ms) | "
              f"{medians['bfloat16'] / f32:.2f} | {medians['int8'] / f32:.2f} |")
    medians = update_only_times()
    f32 = medians["float32"]
    print(f"| update only: one 16M leaf | 1.00 ({f32 * 1e3:.1f} ms) | "
          f"{medians['bfloat16'] / f32:.2f} | {medians['int8'] / f32:.2f} |")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
