"""The original Keras example, once in Keras and once in plain JAX, for the parity tests.

Keras: ``Sequential([Input((20,)), Dense(64, relu), Dense(1, sigmoid)])``, binary cross-entropy,
``Adam(learning_rate=0.001)``, 50 epochs, batch size 32, no shuffling, on ``np.random`` data. The
JAX twin starts from Keras's own initial weights, computes Keras's loss exactly, and reports the
per-epoch loss the way ``fit`` does. Used by ``test_keras_example.py`` (float32) and by
``_float64_cases.py`` (float64, with ``keras.config.set_floatx("float64")``).
"""

import numpy as np

EPOCHS = 50
BATCH = 32
# Keras's backend.epsilon(): binary cross-entropy clips probabilities to [1e-7, 1 - 1e-7].
CLIP = 1e-7


def data(dtype):
    """Inputs rand(1000, 20) and labels randint(2, (1000, 1)) from np.random seeded with 0."""
    rng = np.random.RandomState(0)  # the same stream as np.random.seed(0)
    x = rng.rand(1000, 20).astype(dtype)
    y = rng.randint(2, size=(1000, 1)).astype(dtype)
    return x, y


def keras_run(x, y):
    """Train the example with Keras; return (initial weights, per-epoch losses, final weights)."""
    from ._peers import import_keras

    keras = import_keras()
    init = keras.initializers.GlorotUniform  # Dense's default, seeded so the run is repeatable
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(64, activation="relu", kernel_initializer=init(seed=1)),
            keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init(seed=2)),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="binary_crossentropy")
    initial = [np.array(w.value) for w in model.weights]
    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0)
    return initial, np.array(history.history["loss"]), [np.array(w.value) for w in model.weights]


def jax_run(tx, initial, x, y):
    """Train the same model in plain JAX with ``tx``; return (per-epoch losses, final weights)."""
    import jax
    import jax.numpy as jnp
    import optax

    def batch_loss(weights, xb, yb):
        k1, b1, k2, b2 = weights
        p = jax.nn.sigmoid(jax.nn.relu(xb @ k1 + b1) @ k2 + b2)
        p = jnp.clip(p, CLIP, 1.0 - CLIP)
        return jnp.mean(-(yb * jnp.log(p) + (1.0 - yb) * jnp.log(1.0 - p)))

    def step(carry, batch):
        weights, state = carry
        loss, grads = jax.value_and_grad(batch_loss)(weights, *batch)
        updates, state = tx.update(grads, state, weights)
        return (optax.apply_updates(weights, updates), state), loss

    full = (len(x) // BATCH) * BATCH
    xs, ys = x[:full].reshape(-1, BATCH, x.shape[1]), y[:full].reshape(-1, BATCH, 1)
    x_last, y_last = x[full:], y[full:]

    @jax.jit
    def epoch(weights, state):
        (weights, state), losses = jax.lax.scan(step, (weights, state), (xs, ys))
        (weights, state), last = step((weights, state), (x_last, y_last))
        # fit reports the running mean of the batch losses, weighted by batch size.
        return weights, state, (jnp.sum(losses) * BATCH + last * len(x_last)) / len(x)

    weights = [jnp.asarray(w) for w in initial]
    state = tx.init(weights)
    losses = []
    for _ in range(EPOCHS):
        weights, state, loss = epoch(weights, state)
        losses.append(loss)
    return np.array(losses), [np.asarray(w) for w in weights]


def loss_error(losses, keras_losses):
    """The largest relative difference between two per-epoch loss curves."""
    return float(np.max(np.abs(losses - keras_losses) / keras_losses))


def weight_error(weights, keras_weights):
    """The largest absolute difference between two lists of weight arrays."""
    return max(float(np.max(np.abs(w - kw))) for w, kw in zip(weights, keras_weights))


def weight_drift(weights, keras_weights):
    """The largest weight difference relative to the largest Keras weight of the same tensor."""
    return max(float(np.max(np.abs(w - kw)) / np.max(np.abs(kw))) for w, kw in zip(weights, keras_weights))


def compare(initial, keras_losses, keras_weights, x, y):
    """Train adamx's Keras form and plain optax.adam; measure both against Keras."""
    import optax

    import adamx

    results = {}
    for name, tx in (
        ("adamx", adamx.adam(1e-3, eps=1e-7, eps_hat=True)),
        ("optax", optax.adam(1e-3, eps=1e-7)),
    ):
        losses, weights = jax_run(tx, initial, x, y)
        results[name] = {
            "loss_error": loss_error(losses, keras_losses),
            "weight_error": weight_error(weights, keras_weights),
            "weight_drift": weight_drift(weights, keras_weights),
            "loss_errors": (np.abs(losses - keras_losses) / keras_losses).tolist(),
        }
    return results
