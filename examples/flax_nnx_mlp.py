"""Train the digits MLP on the Flax NNX API with adamx.

    python examples/flax_nnx_mlp.py                 # 20 epochs of Adam at 1e-3
    python examples/flax_nnx_mlp.py --epochs 5 --learning-rate 3e-3

The same data, model shape and Keras-style table as `flax_mlp.py --task digits`, written the NNX
way: a stateful `nnx.Module`, `nnx.Optimizer(model, adamx.adam(lr), wrt=nnx.Param)`, and one
`nnx.jit` training step that calls `optimizer.update(model, grads)`.
"""

import statistics
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adamx
from _common import (OneLineParser, RunError, check_finite_loss, epoch_line, load_task, positive_float,
                     positive_int, seed_int)


class MLP(nnx.Module):
    """64 -> 128 (ReLU) -> 10 logits, Glorot-uniform kernels as in Keras."""

    def __init__(self, inputs, hidden, outputs, *, rngs):
        init = nnx.initializers.glorot_uniform()
        self.hidden = nnx.Linear(inputs, hidden, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(hidden, outputs, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model, x, y):
    """Mean softmax cross-entropy, and the logits for the accuracy."""
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@nnx.jit
def train_step(model, optimizer, x, y):
    """One Adam step on a batch; returns the batch's mean loss and number of correct rows."""
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return loss, jnp.sum(jnp.argmax(logits, axis=-1) == y)


@nnx.jit
def evaluate(model, x, y):
    """Mean loss and accuracy on all of (x, y)."""
    loss, logits = loss_fn(model, x, y)
    return loss, jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))


def build_parser():
    parser = OneLineParser(prog="flax_nnx_mlp.py", description=__doc__.split("\n")[0])
    parser.add_argument("--learning-rate", type=positive_float, default=1e-3)
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="rows per step (default 32); one larger than the training set is all "
                             "of it, one step per epoch, as in Keras's fit")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="in [0, 2**32 - 1]: init and data order (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv=None):
    """Runs the example.

    Args:
        argv: the flags (default `sys.argv[1:]`).

    Returns:
        A dict with `history` (per-epoch loss, accuracy, val_loss, val_accuracy),
        `epoch_times` (the first includes the compile) and `test_accuracy`.

    Raises:
        SystemExit: with status 2 and one line on stderr, for a bad flag or when the training
            loss becomes inf or NaN.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return train(args)
    except RunError as error:
        parser.error(str(error))


def train(args):
    """Trains the MLP as the flags say; returns what `main` does."""
    say = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))
    data = load_task("digits")
    model = MLP(data.x_train.shape[1], data.hidden[0], data.num_classes, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, adamx.adam(args.learning_rate), wrt=nnx.Param)
    order_rng = np.random.default_rng(args.seed + 1)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n = len(data.x_train)
    batch_size = min(args.batch_size, n)  # a larger batch is all rows, as in Keras's fit
    starts = range(0, n, batch_size)
    say(f"digits (NNX): {n} train / {len(data.x_test)} test rows, "
        f"adam(learning_rate={args.learning_rate:g}), {args.epochs} epochs, batch {batch_size}")
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    epoch_times = []
    step = nnx.cached_partial(train_step, model, optimizer)
    for epoch in range(args.epochs):
        say(f"Epoch {epoch + 1}/{args.epochs}")
        order = order_rng.permutation(n)
        tic = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for start in starts:
            rows = order[start:start + batch_size]
            loss, hits = step(data.x_train[rows], data.y_train[rows])
            loss_sum += float(loss) * len(rows)
            correct += int(hits)
        epoch_times.append(time.perf_counter() - tic)
        val_loss, val_accuracy = evaluate(model, x_test, y_test)
        metrics = {"loss": loss_sum / n, "accuracy": correct / n,
                   "val_loss": float(val_loss), "val_accuracy": float(val_accuracy)}
        for key in history:
            history[key].append(metrics[key])
        say(epoch_line(len(starts), epoch_times[-1], metrics))
        check_finite_loss(metrics["loss"], epoch + 1)
    steady = epoch_times[1:] or epoch_times
    say(f"test accuracy {history['val_accuracy'][-1]:.4f} | "
        f"steady {1.0 / statistics.median(steady):.1f} epochs/s")
    return {"history": history, "epoch_times": epoch_times,
            "test_accuracy": history["val_accuracy"][-1]}


if __name__ == "__main__":
    main()
