"""Shared pieces of the Flax examples: the data sets and Keras-style epoch lines.

Private to `examples/`: both `flax_mlp.py` (Linen) and `flax_nnx_mlp.py` (NNX) import it, so the
two APIs train on exactly the same arrays and print the same table.
"""

import argparse
import os
import sys

import numpy as np

# Keras's defaults for the same optimizers, so `--compare` puts each at its usual setting.
DEFAULT_LEARNING_RATES = {
    "adam": 1e-3,
    "adamw": 1e-3,
    "amsgrad": 1e-3,
    "nadam": 1e-3,
    "sgd": 1e-2,
    "rmsprop": 1e-3,
    "adagrad": 1e-3,
}


class Dataset:
    """Train and test arrays of one task, float32 inputs and int32 labels.

    Attributes:
        x_train, y_train, x_test, y_test: the arrays.
        num_classes: 1 for a binary task (one sigmoid output), else the number of classes.
        hidden: the hidden layer widths of the MLP for this task.
        default_epochs: the epoch count of the task's default run.
    """

    def __init__(self, x_train, y_train, x_test, y_test, num_classes, hidden, default_epochs):
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.num_classes = num_classes
        self.hidden = hidden
        self.default_epochs = default_epochs


def load_task(task, seed=0):
    """Builds the arrays of a task.

    Args:
        task: "digits" (scikit-learn's bundled 8x8 digits, fixed 75/25 stratified split) or "seed"
            (the Keras example this project grew from: uniform noise inputs, random binary labels,
            1000 training rows, plus 200 fresh rows from the same distribution as a test set).
        seed: the seed of the "seed" task's random data (the digits split is always the same).

    Returns:
        A `Dataset`.

    Raises:
        ValueError: for an unknown task.

    >>> load_task("seed").x_train.shape
    (1000, 20)
    """
    if task == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int32)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        return Dataset(x_tr, y_tr, x_te, y_te, num_classes=10, hidden=(128,), default_epochs=20)
    if task == "seed":
        rng = np.random.default_rng(seed)
        x = rng.random((1200, 20)).astype(np.float32)
        y = rng.integers(0, 2, size=(1200,)).astype(np.int32)
        return Dataset(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=1, hidden=(64,),
                       default_epochs=50)
    raise ValueError(f"unknown task {task!r}; expected 'digits' or 'seed'")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2, no usage dump."""

    def error(self, message):
        """Prints `prog: error: message` and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class RunError(Exception):
    """A problem found while running (a file, a checkpoint, a diverged loss): one line, status 2."""


# The examples train in float32: a learning rate must survive the cast, neither overflowing to inf
# (1e39 is finite in float64) nor falling below the smallest normal float32.
FLOAT32_MIN, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def positive_float(text):
    """Parses a learning rate: a positive number that is finite and normal in float32.

    >>> positive_float("1e-3")
    0.001
    >>> positive_float("1e39")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be in [1.18e-38, 3.4e+38] (positive, finite in float32), got 1e+39
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not FLOAT32_MIN <= value <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be in [{FLOAT32_MIN:.3g}, {FLOAT32_MAX:.3g}] (positive, finite in float32), "
            f"got {value:g}")
    return value


def output_file(*suffixes):
    """An argparse type: a path where a new file ending in one of `suffixes` can be written.

    Rejects, at parse time rather than after training, a directory (a plotting or saving library
    would silently write `DIR.png` or `DIR.npz` beside it), a name with another ending, a parent
    directory that does not exist, and one that is not writable.

    >>> output_file(".npz")("params.npz")
    'params.npz'
    """
    endings = " or ".join(filter(None, [", ".join(suffixes[:-1]), suffixes[-1]]))

    def parse(text):
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is a directory; expected a file name ending in {endings}")
        if not text.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"expected a file name ending in {endings}, got {text!r}")
        parent = os.path.dirname(text) or "."
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"the directory {parent!r} of {text!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write in the directory {parent!r}")
        return text

    return parse


def check_finite_loss(loss, epoch):
    """Raises RunError when an epoch's mean loss is inf or NaN: a diverged model is not a result.

    >>> check_finite_loss(float("nan"), 3)
    Traceback (most recent call last):
    _common.RunError: the training loss became non-finite (nan) in epoch 3; try a smaller --learning-rate
    """
    if not np.isfinite(loss):
        raise RunError(f"the training loss became non-finite ({loss}) in epoch {epoch}; "
                       "try a smaller --learning-rate")


def integer(text):
    """Parses an integer, or raises the one-line `ArgumentTypeError` argparse prints."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text):
    """Parses a count: an integer >= 1.

    >>> positive_int("32")
    32
    """
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_in_range(low, high):
    """An argparse type: an integer in [low, high].

    >>> int_in_range(1, 3600)("60")
    60
    >>> int_in_range(1, 3600)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be in [1, 3600], got 0
    """

    def parse(text):
        value = integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


# A seed feeds jax.random.key and NumPy's default_rng. The key keeps only the low 32 bits while
# 64-bit mode is off (2**32 gives seed 0's key; from 2**63 on it raises OverflowError), and
# default_rng refuses negative seeds: in [0, 2**32 - 1] every seed is a run of its own.
seed_int = int_in_range(0, 2**32 - 1)


def epoch_line(num_batches, seconds, metrics):
    """Formats one epoch the way `keras.Model.fit` does off a terminal.

    Args:
        num_batches: steps in the epoch.
        seconds: wall time of the epoch.
        metrics: dict with loss, accuracy, val_loss, val_accuracy.

    Returns:
        A line such as `42/42 - 0s - 2ms/step - loss: 0.3120 - accuracy: 0.9115 - ...`.

    >>> epoch_line(2, 0.004, dict(loss=1.0, accuracy=0.5, val_loss=1.0, val_accuracy=0.5))
    '2/2 - 0s - 2ms/step - loss: 1.0000 - accuracy: 0.5000 - val_loss: 1.0000 - val_accuracy: 0.5000'
    """
    per_step = seconds / num_batches
    step = f"{per_step * 1e3:.0f}ms/step" if per_step >= 1e-3 else f"{per_step * 1e6:.0f}us/step"
    parts = [f"{num_batches}/{num_batches}", f"{seconds:.0f}s", step]
    parts += [f"{k}: {metrics[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy")]
    return " - ".join(parts)


def is_terminal(stream=None):
    """True when `stream` (default stdout) is an interactive terminal, so a live bar makes sense."""
    stream = sys.stdout if stream is None else stream
    return hasattr(stream, "isatty") and stream.isatty()
