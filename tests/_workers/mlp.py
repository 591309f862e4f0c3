"""The workload of the multi-device tests: a 64-128-10 tanh MLP trained data-parallel on seeded data.

Self-contained (NumPy data, no examples/, no scikit-learn), so the library's sharding tests need
only jax and optax. The worker scripts beside it import it by name (they run as
``python tests/_workers/<script>.py``); tests/test_multiprocess.py loads it by file path for its
single-device oracle.

The shapes are those of the digits example's MLP, which the ZeRO-1 claims rely on: 8 divides
every dimension except the output's 10. The hidden layer is tanh, not ReLU: the tests compare runs
whose float32 rounding differs (adamx vs optax, 8 devices vs one) to 1e-5 after 10 steps, and a
ReLU kink that a rounding difference moves a row across turns 1e-7 into a different gradient,
which Adam's m / sqrt(v) then grows to a whole step (1e-2 on some seeds). tanh keeps the
difference at float32 rounding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import adamx

SIZES = (64, 128, 10)  # inputs, hidden, classes
ROWS = 1536


def synthetic_data(seed=0):
    """`ROWS` standard normal float32 inputs and the int32 labels of a random linear teacher.

    The teacher makes the labels learnable, so training moves the params the way real data does.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, SIZES[0]), dtype=np.float32)
    teacher = rng.standard_normal((SIZES[0], SIZES[-1]))
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    return x, y


def init_mlp(key, sizes=SIZES):
    """Glorot-uniform kernels and zero biases, as {"dense_i": {"kernel", "bias"}}."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        params[f"dense_{i}"] = {
            "kernel": jax.random.uniform(sub, (fan_in, fan_out), jnp.float32, -limit, limit),
            "bias": jnp.zeros((fan_out,), jnp.float32),
        }
    return params


def loss_fn(params, x, y):
    """Mean softmax cross-entropy of the MLP (tanh after every layer but the last)."""
    layers = [params[f"dense_{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    logits = x @ layers[-1]["kernel"] + layers[-1]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def global_array(host, sharding):
    """A global jax.Array from a host array every process holds whole (each takes its shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """NumPy copies of replicated arrays (every process holds them whole)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def train(tx, mesh, x, y, *, steps, batch_size=128, seed=0, zero1=False, dtype=None,
          offload=False, keep_state=False):
    """``steps`` data-parallel steps over ``mesh`` (axis "data"); returns the final params (NumPy).

    The params are replicated and each global batch is split over "data"; ``zero1`` splits the
    optimizer state over "data" too (``adamx.zero1_shardings``), and ``offload`` keeps it in
    pinned host memory (``adamx.host_offload_shardings``). ``dtype`` casts the params (e.g. to
    bfloat16). The init and the batch order come from ``seed`` alone, so the run is the same
    whatever the number of processes and devices. ``keep_state`` also returns the final state.
    """
    if steps * batch_size > len(x):
        raise ValueError(f"train: {steps} steps of {batch_size} rows need more than {len(x)} rows")
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    params = init_mlp(jax.random.key(seed))
    if dtype is not None:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    params = jax.device_put(params, replicated)
    abstract_state = jax.eval_shape(tx.init, params)
    if zero1:
        state_shardings = adamx.zero1_shardings(abstract_state, mesh)
    else:
        state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
    if offload:
        state_shardings = adamx.host_offload_shardings(state_shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, out_shardings=(replicated, state_shardings), donate_argnums=(0, 1))
    order = np.random.default_rng(seed).permutation(len(x))
    for b in range(steps):
        index = order[b * batch_size:(b + 1) * batch_size]
        params, state = step(params, state, global_array(x[index], rows),
                             global_array(y[index], rows))
    return (to_host(params), state) if keep_state else to_host(params)
