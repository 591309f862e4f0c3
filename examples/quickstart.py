"""Fit a small linear model with adamx inside a jitted, buffer-donating training step.

    python examples/quickstart.py                              # 300 steps of Adam at 0.05
    python examples/quickstart.py --steps 100 --learning-rate 0.1

`main(argv)` returns the fitted params and the data as NumPy arrays, so tests can call it. A bad
flag, or a loss that became inf or NaN, ends it with one line on stderr and exit status 2.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx
from _common import OneLineParser, RunError, positive_float, positive_int, seed_int


def build_parser():
    parser = OneLineParser(prog="quickstart.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=300, help="default 300")
    parser.add_argument("--learning-rate", type=positive_float, default=0.05, help="default 0.05")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="in [0, 2**32 - 1]: the data (default 0)")
    return parser


def fit(steps, learning_rate, seed):
    """Fits w, b to y = x @ w_true + noise; returns the final params, x, y and w_true (NumPy)."""
    key_x, key_w, key_noise = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_x, (256, 8))
    true_w = jax.random.normal(key_w, (8,))
    y = x @ true_w + 0.01 * jax.random.normal(key_noise, (256,))

    def loss_fn(params):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    tx = optax.chain(optax.clip_by_global_norm(10.0), adamx.adam(learning_rate))
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        params, state, loss = step(params, state)
        if i % 50 == 0 or i == steps - 1:
            loss = float(loss)
            print(f"step {i:4d}  loss {loss:.6f}")
            if not math.isfinite(loss):
                raise RunError(f"the loss is non-finite ({loss}) at step {i}; "
                               "try a smaller --learning-rate")
    error = float(jnp.max(jnp.abs(params["w"] - true_w)))
    print(f"max |w - w_true| = {error:.4f}")
    return jax.tree.map(np.asarray, {"params": params, "x": x, "y": y, "true_w": true_w})


def main(argv=None):
    """Runs the example.

    Args:
        argv: the flags (default `sys.argv[1:]`).

    Returns:
        A dict of NumPy arrays: `params` (`w`, `b`), the data `x`, `y`, and `true_w`.

    Raises:
        SystemExit: with status 2 and one line on stderr, for a bad flag or when the loss becomes
            inf or NaN.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return fit(args.steps, args.learning_rate, args.seed)
    except RunError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
