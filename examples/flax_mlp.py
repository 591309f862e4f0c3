"""Train a Flax Linen MLP with adamx, printing a Keras-style table per epoch.

    python examples/flax_mlp.py                              # digits, Adam, 20 epochs
    python examples/flax_mlp.py --task seed                  # the original Keras example
    python examples/flax_mlp.py --compare adam,sgd,rmsprop,adagrad --plot compare.png
    python examples/flax_mlp.py --checkpoint-dir ckpt        # kill it, then add --resume

The model is a `flax.training.train_state.TrainState` whose `tx` is `adamx.adam(...)` (or another
optimizer of `--optimizer`). One epoch is one jitted function: a `lax.scan` over the shuffled
batches with the state's buffers donated, compiled ahead of time so the compile is timed apart.

`main(argv)` returns the run as a dict (history, timings, final params), so other code can call it.
Every problem with the flags, the files or the run (a damaged checkpoint, a --resume with other
flags, a loss that became inf or NaN) ends it with one line on stderr and exit status 2.
"""

import argparse
import contextlib
import logging
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
from _common import (DEFAULT_LEARNING_RATES, OneLineParser, RunError, check_finite_loss, epoch_line,
                     is_terminal, load_task, output_file, positive_float, positive_int, seed_int)

OPTIMIZERS = {
    "adam": adamx.adam,
    "adamw": adamx.adamw,
    "amsgrad": adamx.amsgrad,
    "nadam": adamx.nadam,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}


# The flag behind each entry of a run's config, to name it when a --resume does not match.
CONFIG_FLAGS = {"task": "--task", "optimizer": "--optimizer", "seed": "--seed",
                "learning_rate": "--learning-rate", "batch_size": "--batch-size"}
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


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
    every row is seen once per epoch and each step averages over its real rows, as Keras does. A
    batch larger than the data is all of it, one step per epoch, as in Keras's `fit` (and no
    padding is allocated for rows that do not exist).
    """
    batch_size = min(batch_size, num_examples)
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
    """Saves and restores params, optimizer state, step and data-order RNG with orbax.

    Saves are synchronous. An asynchronous save that fails (say, the directory cannot be created)
    leaves orbax's non-daemon threads waiting up to 300 s for a signal that never comes, so the
    process would hang after the error; a synchronous save raises in `save` and nothing lingers.
    Every orbax failure becomes a one-line `RunError` naming the directory.
    """

    def __init__(self, directory):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory
        try:
            with self._reading():
                self.manager = ocp.CheckpointManager(
                    os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
                        max_to_keep=2, enable_async_checkpointing=False))
        except OSError as error:
            raise RunError(f"--checkpoint-dir: cannot use {directory!r}: {error.strerror}") from None

    def latest_epoch(self):
        """The last fully written epoch, or None."""
        with self._reading():
            return self.manager.latest_step()

    def save(self, epoch, state, rng, meta):
        tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
                "rng": jax.random.key_data(rng)}
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(host_copy(tree)),
                                        meta=self._ocp.args.JsonSave(meta))
        try:
            self.manager.save(epoch, args=args)
        except OSError as error:
            raise RunError(f"--checkpoint-dir: cannot save epoch {epoch} in {self.directory!r}: "
                           f"{error.strerror}") from None

    @staticmethod
    @contextlib.contextmanager
    def _reading():
        """Mutes orbax's log lines while reading: the damage they report ends up in a RunError."""
        logger = logging.getLogger("absl")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)

    def _unreadable(self, epoch, reason):
        return RunError(f"--resume: the checkpoint of epoch {epoch} in {self.directory!r} is "
                        f"unreadable or corrupt ({reason})")

    def restore_meta(self):
        """Returns (epoch, meta) of the latest checkpoint: the run's config, epoch and history."""
        epoch = self.latest_epoch()
        try:
            with self._reading():
                meta = self.manager.restore(epoch, args=self._ocp.args.Composite(
                    meta=self._ocp.args.JsonRestore()))["meta"]
        except Exception as error:  # orbax raises many types for a damaged file; all mean the same
            raise self._unreadable(epoch, first_line(error)) from None
        fields = {"epoch": int, "history": dict, "config": dict}
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in fields.items()):
            raise self._unreadable(epoch, "its metadata lacks epoch, history or config")
        if meta["epoch"] != epoch or any(len(v) != epoch for v in meta["history"].values()):
            raise self._unreadable(epoch, "its metadata does not describe that epoch")
        return epoch, meta

    def restore(self, state, rng):
        """Returns (state, rng) of the latest checkpoint, shaped like `state` and `rng`."""
        epoch = self.latest_epoch()
        target = host_copy({"params": state.params, "opt_state": state.opt_state,
                            "step": state.step, "rng": jax.random.key_data(rng)})
        try:
            with self._reading():
                restored = self.manager.restore(epoch, args=self._ocp.args.Composite(
                    state=self._ocp.args.StandardRestore(target)))["state"]
        except Exception as error:  # orbax raises many types for a damaged file; all mean the same
            raise self._unreadable(epoch, first_line(error)) from None
        expected = jax.tree.map(lambda a: (a.shape, a.dtype), target)
        if jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), restored) != expected:
            raise self._unreadable(epoch, "its arrays do not have the model's shapes and dtypes")
        tree = jax.tree.map(jnp.asarray, restored)
        state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
        return state, jax.random.wrap_key_data(tree["rng"])

    def close(self):
        self.manager.close()


def first_line(error):
    """`Type: first line of the message`, short enough for a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def config_difference(saved, config):
    """The first flag whose value differs between a checkpoint's config and this run's, or None."""
    for key, flag in CONFIG_FLAGS.items():
        if saved.get(key) != config[key]:
            return f"{flag} {saved.get(key)}, not {config[key]}"
    return None


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


def train(data, config, epochs, checkpoints=None, resume=False, quiet=False, say=print):
    """Trains one optimizer on `data`; returns history, timings, final params and test accuracy.

    Raises:
        RunError: when a --resume checkpoint is unreadable or was written with other flags, when
            a checkpoint cannot be saved, or when the training loss becomes inf or NaN.
    """
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    state = create_state(data, config["optimizer"], config["learning_rate"], config["seed"])
    rng = jax.random.key(config["seed"] + 1)
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    start_epoch = 0
    if resume:
        # The config first: another optimizer or task would not even match the arrays' structure.
        start_epoch, meta = checkpoints.restore_meta()
        difference = config_difference(meta["config"], config)
        if difference:
            raise RunError(f"--resume: the checkpoint in {checkpoints.directory!r} was written "
                           f"with {difference}")
        if start_epoch > epochs:
            raise RunError(f"--resume: the checkpoint in {checkpoints.directory!r} is of epoch "
                           f"{start_epoch}, past --epochs {epochs}")
        state, rng = checkpoints.restore(state, rng)
        history = meta["history"]
        say(f"Resumed from epoch {start_epoch} in {checkpoints.directory}")

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
        check_finite_loss(history["loss"][-1], epoch + 1)
        if checkpoints:
            checkpoints.save(epoch + 1, state, rng,
                             {"epoch": epoch + 1, "history": history, "config": config})
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
    try:
        fig.savefig(path, dpi=110)
    except OSError as error:
        raise RunError(f"--plot: cannot write {path!r}: {error.strerror}") from None
    finally:
        plt.close(fig)


def optimizer_name(text):
    """Parses --optimizer: a key of `OPTIMIZERS`."""
    if text not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {text!r}; choose from {', '.join(OPTIMIZERS)}")
    return text


def optimizer_names(text):
    """Parses --compare: distinct optimizer names separated by commas, such as `adam,sgd`."""
    names = text.split(",")
    if "" in names:
        raise argparse.ArgumentTypeError(
            f"expected optimizer names separated by commas, such as adam,sgd, got {text!r}")
    repeated = [name for i, name in enumerate(names) if name in names[:i]]
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]!r} is listed twice in {text!r}")
    return [optimizer_name(name) for name in names]


def build_parser():
    parser = OneLineParser(prog="flax_mlp.py", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("digits", "seed"), default="digits",
                        help="digits: sklearn's 8x8 digits; seed: the original Keras example")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--optimizer", type=optimizer_name, default="adam",
                       help="one of " + ", ".join(OPTIMIZERS) + " (default adam)")
    parser.add_argument("--learning-rate", type=positive_float,
                        help="default: Keras's default for the optimizer (1e-3 for Adam)")
    parser.add_argument("--epochs", type=positive_int, help="default: 20 (digits), 50 (seed)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="rows per step (default 32); one larger than the training set is all "
                             "of it, one step per epoch, as in Keras's fit")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="in [0, 2**32 - 1]: init, data order and seed-task data (default 0)")
    parser.add_argument("--plot", metavar="FILE.png", type=output_file(*PLOT_SUFFIXES),
                        help="write loss/accuracy curves (.png, .pdf or .svg)")
    which.add_argument("--compare", metavar="OPT,OPT,...", type=optimizer_names,
                       help="instead of --optimizer: train each of these distinct optimizers from "
                            "the same init; one curve each")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="save a checkpoint every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def parse(argv):
    """Parses and cross-checks flags; every problem is one `parser.error` line (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.compare or [args.optimizer]
    if args.checkpoint_dir == "":
        parser.error("--checkpoint-dir: expected a directory name, got ''")
    if args.compare and (args.checkpoint_dir or args.resume):
        parser.error("--checkpoint-dir/--resume apply to a single --optimizer run, not --compare")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir DIR")
    if args.resume and not os.path.exists(args.checkpoint_dir):
        parser.error(f"--resume: checkpoint directory {args.checkpoint_dir!r} does not exist")
    if args.checkpoint_dir and os.path.exists(args.checkpoint_dir) and not os.path.isdir(
            args.checkpoint_dir):
        parser.error(f"--checkpoint-dir: {args.checkpoint_dir!r} exists and is not a directory")
    return parser, args, names


def open_checkpoints(args):
    """The run's `Checkpoints` (None without --checkpoint-dir), after checking --resume against it."""
    if not args.checkpoint_dir:
        return None
    checkpoints = Checkpoints(args.checkpoint_dir)
    has_checkpoint = checkpoints.latest_epoch() is not None
    if args.resume and not has_checkpoint:
        checkpoints.close()
        raise RunError(f"--resume: no checkpoint in {args.checkpoint_dir!r}")
    if not args.resume and has_checkpoint:
        checkpoints.close()
        raise RunError(f"{args.checkpoint_dir!r} already holds checkpoints; add --resume")
    return checkpoints


def run(args, names, say):
    """Trains each optimizer of `names` and writes the plot; see `main` for what it returns."""
    data = load_task(args.task, seed=args.seed)
    checkpoints = open_checkpoints(args)  # --checkpoint-dir comes with a single optimizer only
    try:
        runs = {name: train_one(args, name, data, checkpoints, say) for name in names}
    finally:
        if checkpoints:
            checkpoints.close()
    if args.plot:
        histories = {name: result["history"] for name, result in runs.items()}
        plot(histories, args.plot, f"{args.task}: " + ", ".join(
            f"{n} lr={runs[n]['config']['learning_rate']:g}" for n in names))
        say(f"wrote {args.plot}")
    return {"runs": runs} if args.compare else runs[names[0]]


def train_one(args, name, data, checkpoints, say):
    """Trains optimizer `name` on `data` with the flags' settings and prints its summary line."""
    epochs = args.epochs or data.default_epochs
    config = {"task": args.task, "optimizer": name, "seed": args.seed,
              "learning_rate": args.learning_rate or DEFAULT_LEARNING_RATES[name],
              "batch_size": args.batch_size}
    layers = "-".join(str(n) for n in (data.x_train.shape[1], *data.hidden, data.num_classes))
    say(f"{args.task}: {len(data.x_train)} train / {len(data.x_test)} test rows, "
        f"MLP {layers}, {name}(learning_rate={config['learning_rate']:g}), "
        f"{epochs} epochs, batch {min(args.batch_size, len(data.x_train))}")
    try:
        result = train(data, config, epochs, checkpoints, args.resume, args.quiet, say)
    except RunError as error:
        raise RunError(f"{name}: {error}" if args.compare else str(error)) from None
    timed = len(result["epoch_times"])
    timing = (f"first-epoch compile {result['compile_s']:.2f} s | steady "
              f"{result['epochs_per_s']:.1f} epochs/s (median of {max(timed - 1, 1)} epochs)"
              if timed else "no epoch left to train: the checkpoint holds the last one")
    say(f"test accuracy {result['test_accuracy']:.4f} | {timing}")
    return result


def main(argv=None):
    """Runs the example.

    Args:
        argv: the flags (default `sys.argv[1:]`).

    Returns:
        For one optimizer: a dict with `history` (per-epoch loss, accuracy, val_loss,
        val_accuracy), `compile_s`, `epoch_times`, `epochs_per_s`, `params` (NumPy),
        `test_accuracy` and `config`. With `--compare`: `{"runs": {optimizer: that dict}}`.

    Raises:
        SystemExit: with status 2 and one line on stderr, for a bad flag or any `RunError`.
    """
    parser, args, names = parse(argv)
    say = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))
    try:
        return run(args, names, say)
    except RunError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
