"""Run every parity case in float64 and print each case's largest relative error as JSON.

Run as ``python -m tests.parity._float64_cases`` from the repository root. It is a separate
process because float64 JAX needs ``jax_enable_x64`` set before any array is made, and the rest
of the test suite runs in float32. A peer that is not installed is reported as ``null``.
"""

import importlib.util
import json
import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from ._cases import FLOAT64, run_case  # noqa: E402
from ._keras_example import compare, data, keras_run  # noqa: E402
from ._peers import (  # noqa: E402
    FixedGradients,
    gradient_sequence,
    initial_params,
    max_relative_error,
)


def main():
    """Print {"peer/case": max relative error or null} for the cases listed in FLOAT64.

    Also the Keras example in float64, under "keras_example": adamx's and plain optax's
    distances from Keras (see ``_keras_example.compare``).
    """
    params0 = initial_params(0, np.float64)
    source = FixedGradients(gradient_sequence(0, np.float64))
    results = {}
    for peer in ("torch", "keras", "optax"):
        available = importlib.util.find_spec(peer) is not None
        for name in FLOAT64[peer]:
            if not available:
                results[f"{peer}/{name}"] = None
                continue
            expected, actual = run_case(peer, name, params0, source)
            dtypes = {str(v.dtype) for v in (*actual.values(), *expected.values())}
            # A float32 leaf on either side would make a 1e-10 comparison meaningless.
            if dtypes == {"float64"}:
                results[f"{peer}/{name}"] = max_relative_error(actual, expected)
            else:
                results[f"{peer}/{name}"] = f"dtypes {sorted(dtypes)}"
    if importlib.util.find_spec("keras") is None:
        results["keras_example"] = None
    else:
        import keras

        # The example's Keras layers, optimizer variables and loss tracker follow floatx.
        keras.config.set_floatx("float64")
        x, y = data(np.float64)
        initial, keras_losses, keras_weights = keras_run(x, y)
        dtypes = {str(w.dtype) for w in (*initial, *keras_weights)} | {str(keras_losses.dtype)}
        assert dtypes == {"float64"}, dtypes
        results["keras_example"] = compare(initial, keras_losses, keras_weights, x, y)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
