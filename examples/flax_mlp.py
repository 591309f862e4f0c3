"""Train a Flax Linen MLP with adamx, printing a Keras-style table per epoch.

    python examples/flax_mlp.py                              # digits, Adam, 20 epochs
    python examples/flax_mlp.py --task seed                  # the original Keras example
    python examples/flax_mlp.py --compare adam,sgd,rmsprop,adagrad --plot compare.png
    python examples/flax_mlp.py --checkpoint-dir /tmp/run    # kill it, then add --resume

The model is a `flax.training.train_state.TrainState` whose `tx` is `adamx.adam(...)` (or another
optimizer of `--optimizer`). One epoch is one jitted function: a `lax.scan` over the shuffled
batches with the state's buffers donated, compiled ahead of time so the compile is timed apart.

`main(argv)` returns the run as a dict (history, timings, final params), so other code can call it.
"""

import math
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import adamx
from _common import (DEFAULT_LEARNING_RATES, OneLineParser, epoch_line, is_terminal, load_task,
                     positive_float, positive_int)

OPTIMIZERS = {
    "adam": adamx.adam,
    "adamw": adamx.adamw,
    "amsgrad": adamx.amsgrad,
    "nadam": adamx.nadam,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}


class ConfigMismatch(Exception):
    """The flags of a --resume differ from those the checkpoint was written with."""


class MLP(nn.Module):
    """ReLU hidden layers, then a linear output (logits); Glorot-uniform kernels as in Keras."""

    hidden: tuple
    outputs: int

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.glorot_uniform())(x))
        return nn.Dense(self.outputs, kernel_init=nn.initializers.glorot_uniform())(x)


def per_example(logits, labels):
    """Per-example loss and correctness: sigmoid BCE for one output, softmax CE otherwise."""
    if logits.shape[-1] == 1:
        logits = logits[:, 0]
        loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
        correct = (logits > 0) == (labels == 1)
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, axis=-1) == labels
    return loss, correct.astype(loss.dtype)


def make_epoch(num_examples, batch_size, progress=None):
    """Builds `epoch(state, rng, x, y) -> (state, rng, metrics)`, jitted with state and rng donated.

    The rows are shuffled with a key split off `rng`; a short last batch is padded and masked, so
    every row is seen once per epoch and each step averages over its real rows, as Keras does.
    """
    num_batches = math.ceil(num_examples / batch_size)
    padded = num_batches * batch_size

    def epoch(state, rng, x, y):
        rng, key = jax.random.split(rng)
        order = jnp.pad(jax.random.permutation(key, num_examples), (0, padded - num_examples))
        weight = (jnp.arange(padded) < num_examples).astype(jnp.float32)
        batches = (jnp.arange(num_batches), order.reshape(num_batches, batch_size),
                   weight.reshape(num_batches, batch_size))

        def step(state, batch):
            index, rows, w = batch

            def loss_fn(params):
                loss, correct = per_example(state.apply_fn({"params": params}, x[rows]), y[rows])
                return jnp.sum(w * loss) / jnp.sum(w), (loss, correct)

            grads, (loss, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
            if progress is not None:
                jax.debug.callback(progress, index)
            return state.apply_gradients(grads=grads), (jnp.sum(w * loss), jnp.sum(w * correct))

        state, (loss_sums, correct_sums) = jax.lax.scan(step, state, batches)
        metrics = {"loss": jnp.sum(loss_sums) / num_examples,
                   "accuracy": jnp.sum(correct_sums) / num_examples}
        return state, rng, metrics

    return jax.jit(epoch, donate_argnums=(0, 1)), num_batches


@jax.jit
def evaluate(state, x, y):
    """Mean loss and accuracy of `state.params` on all of (x, y)."""
    loss, correct = per_example(state.apply_fn({"params": state.params}, x), y)
    return {"val_loss": jnp.mean(loss), "val_accuracy": jnp.mean(correct)}


def create_state(data, optimizer, learning_rate, seed):
    """A TrainState with freshly initialized params (from `seed`) and `tx` = the optimizer."""
    model = MLP(hidden=data.hidden, outputs=data.num_classes)
    params = model.init(jax.random.key(seed), jnp.zeros((1, data.x_train.shape[1])))["params"]
    tx = OPTIMIZERS[optimizer](learning_rate)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def host_copy(tree):
    """A NumPy copy of a pytree; a copy, because the next epoch donates (reuses) the buffers."""
    return jax.tree.map(np.array, tree)


class Checkpoints:
    """Saves and restores params, optimizer state, step and data-order RNG with orbax."""

    def __init__(self, directory):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def latest_epoch(self):
        """The last fully written epoch, or None."""
        return self.manager.latest_step()

    def save(self, epoch, state, rng, meta):
        tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
                "rng": jax.random.key_data(rng)}
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(host_copy(tree)),
                                        meta=self._ocp.args.JsonSave(meta))
        self.manager.save(epoch, args=args)

    def restore(self, state, rng):
        """Returns (state, rng, meta) of the latest checkpoint, shaped like `state` and `rng`."""
        target = host_copy({"params": state.params, "opt_state": state.opt_state,
                            "step": state.step, "rng": jax.random.key_data(rng)})
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target),
                                        meta=self._ocp.args.JsonRestore())
        restored = self.manager.restore(self.latest_epoch(), args=args)
        tree = jax.tree.map(jnp.asarray, restored["state"])
        state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
        return state, jax.random.wrap_key_data(tree["rng"]), restored["meta"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class Bar:
    """A tqdm bar over one epoch's batches, fed from inside the jitted scan."""

    def __init__(self):
        self.bar = None

    def start(self, total, description):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, leave=False, file=sys.stdout,
                        unit="batch")

    def __call__(self, index):
        del index
        self.bar.update(1)

    def stop(self):
        self.bar.close()


def train(data, config, epochs, checkpoint_dir=None, resume=False, quiet=False, say=print):
    """Trains one optimizer on `data`; returns history, timings, final params and test accuracy."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    state = create_state(data, config["optimizer"], config["learning_rate"], config["seed"])
    rng = jax.random.key(config["seed"] + 1)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    start_epoch = 0
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir else None
    if resume:
        state, rng, meta = checkpoints.restore(state, rng)
        if meta["config"] != config:
            raise ConfigMismatch(f"the checkpoint was written with {meta['config']}, not {config}")
        history, start_epoch = meta["history"], meta["epoch"]
        say(f"Resumed from epoch {start_epoch} in {checkpoint_dir}")

    bar = Bar() if not quiet and is_terminal() else None
    epoch_fn, num_batches = make_epoch(len(x), config["batch_size"], progress=bar)
    tic = time.perf_counter()
    compiled = epoch_fn.lower(state, rng, x, y).compile()
    compile_s = time.perf_counter() - tic
    epoch_times = []
    for epoch in range(start_epoch, epochs):
        say(f"Epoch {epoch + 1}/{epochs}")
        if bar:
            bar.start(num_batches, f"Epoch {epoch + 1}/{epochs}")
        tic = time.perf_counter()
        state, rng, metrics = compiled(state, rng, x, y)
        metrics = jax.block_until_ready(metrics)
        epoch_times.append(time.perf_counter() - tic)
        if bar:
            bar.stop()
        metrics.update(evaluate(state, x_test, y_test))
        for key in history:
            history[key].append(float(metrics[key]))
        say(epoch_line(num_batches, epoch_times[-1], metrics))
        if checkpoints:
            # orbax writes in the background: hand it a snapshot, not the lists we keep appending to.
            snapshot = {key: list(values) for key, values in history.items()}
            checkpoints.save(epoch + 1, state, rng,
                             {"epoch": epoch + 1, "history": snapshot, "config": dict(config)})
    if checkpoints:
        checkpoints.close()
    steady = epoch_times[1:] or epoch_times
    return {"history": history, "compile_s": compile_s, "epoch_times": epoch_times,
            "epochs_per_s": 1.0 / statistics.median(steady) if steady else float("nan"),
            "num_batches": num_batches, "params": host_copy(state.params),
            "test_accuracy": history["val_accuracy"][-1] if history["val_accuracy"] else None,
            "config": config}


def plot(runs, path, title):
    """Writes loss and accuracy per epoch (train solid, test dashed), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in runs.items():
        epochs = np.arange(1, len(history["loss"]) + 1)
        (line,) = ax_loss.plot(epochs, history["loss"], label=f"{label} train")
        ax_loss.plot(epochs, history["val_loss"], "--", color=line.get_color(),
                     label=f"{label} test")
        ax_acc.plot(epochs, history["accuracy"], color=line.get_color(), label=f"{label} train")
        ax_acc.plot(epochs, history["val_accuracy"], "--", color=line.get_color(),
                    label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    parser = OneLineParser(prog="flax_mlp.py", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("digits", "seed"), default="digits",
                        help="digits: sklearn's 8x8 digits; seed: the original Keras example")
    parser.add_argument("--optimizer", default="adam",
                        help="one of " + ", ".join(OPTIMIZERS) + " (default adam)")
    parser.add_argument("--learning-rate", type=positive_float,
                        help="default: Keras's default for the optimizer (1e-3 for Adam)")
    parser.add_argument("--epochs", type=positive_int, help="default: 20 (digits), 50 (seed)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="init, data order and seed-task data")
    parser.add_argument("--plot", metavar="FILE.png", help="write loss/accuracy curves")
    parser.add_argument("--compare", metavar="OPT,OPT,...",
                        help="train each optimizer from the same init; one curve each")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="save a checkpoint every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def parse(argv):
    """Parses and cross-checks flags; every problem is one `parser.error` line (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.compare.split(",") if args.compare else [args.optimizer]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.compare and (args.checkpoint_dir or args.resume):
        parser.error("--checkpoint-dir/--resume apply to a single --optimizer run, not --compare")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir DIR")
    if args.resume and not os.path.isdir(args.checkpoint_dir):
        parser.error(f"--resume: checkpoint directory {args.checkpoint_dir!r} does not exist")
    if args.checkpoint_dir and os.path.isdir(args.checkpoint_dir):
        checkpoints = Checkpoints(args.checkpoint_dir)
        has_checkpoint = checkpoints.latest_epoch() is not None
        checkpoints.close()
        if args.resume and not has_checkpoint:
            parser.error(f"--resume: no checkpoint in {args.checkpoint_dir!r}")
        if not args.resume and has_checkpoint:
            parser.error(f"{args.checkpoint_dir!r} already holds checkpoints; add --resume")
    return parser, args, names


def main(argv=None):
    """Runs the example.

    Args:
        argv: the flags (default `sys.argv[1:]`).

    Returns:
        For one optimizer: a dict with `history` (per-epoch loss, accuracy, val_loss,
        val_accuracy), `compile_s`, `epoch_times`, `epochs_per_s`, `params` (NumPy),
        `test_accuracy` and `config`. With `--compare`: `{"runs": {optimizer: that dict}}`.
    """
    parser, args, names = parse(argv)
    say = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))
    data = load_task(args.task, seed=args.seed)
    epochs = args.epochs or data.default_epochs
    runs = {}
    for name in names:
        config = {"task": args.task, "optimizer": name, "seed": args.seed,
                  "learning_rate": args.learning_rate or DEFAULT_LEARNING_RATES[name],
                  "batch_size": args.batch_size}
        layers = "-".join(str(n) for n in (data.x_train.shape[1], *data.hidden, data.num_classes))
        say(f"{args.task}: {len(data.x_train)} train / {len(data.x_test)} test rows, "
            f"MLP {layers}, {name}(learning_rate={config['learning_rate']:g}), "
            f"{epochs} epochs, batch {args.batch_size}")
        try:
            runs[name] = train(data, config, epochs, args.checkpoint_dir, args.resume,
                               args.quiet, say)
        except ConfigMismatch as error:
            parser.error(str(error))
        run = runs[name]
        say(f"test accuracy {run['test_accuracy']:.4f} | first-epoch compile "
            f"{run['compile_s']:.2f} s | steady {run['epochs_per_s']:.1f} epochs/s "
            f"(median of {max(len(run['epoch_times']) - 1, 1)} epochs)")
    if args.plot:
        histories = {name: run["history"] for name, run in runs.items()}
        plot(histories, args.plot, f"{args.task}: " + ", ".join(
            f"{n} lr={runs[n]['config']['learning_rate']:g}" for n in names))
        say(f"wrote {args.plot}")
    return {"runs": runs} if args.compare else runs[names[0]]


if __name__ == "__main__":
    main()
