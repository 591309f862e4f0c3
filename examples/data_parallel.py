"""Data-parallel training of the digits MLP with adamx, over all devices of one or more processes.

One machine, 8 simulated CPU devices (the batch is split 8 ways, the params are replicated):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py --zero1

Two processes on loopback (start both; each one prints the same lines):

    python examples/data_parallel.py --num-processes 2 --process-id 0 --coordinator 127.0.0.1:8476 &
    python examples/data_parallel.py --num-processes 2 --process-id 1 --coordinator 127.0.0.1:8476

Each process waits at most `--timeout` seconds (default 60) for the coordinator and the others.

The step is one `jax.jit` over a ("data",) mesh of every device: the batch is sharded over "data",
the params are replicated, and XLA inserts the gradient all-reduce. `--zero1` also splits the Adam
moments over "data" with `adamx.zero1_shardings`, so each device keeps about 1/N of them. adamx
has no communication code: JAX's runtime (gloo between CPU processes) does it all.

`main(argv)` returns the final params as NumPy arrays, so tests can call it.
"""

import argparse
import math
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import adamx
from _common import (OneLineParser, RunError, check_finite_loss, int_in_range, integer, load_task,
                     output_file, positive_float, positive_int, seed_int)

DEFAULT_TIMEOUT_S = 60
MAX_PROCESSES = 65536


def init_mlp(key, sizes):
    """Glorot-uniform kernels and zero biases for a ReLU MLP with layer widths ``sizes``."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        params[f"dense_{i}"] = {
            "kernel": jax.random.uniform(sub, (fan_in, fan_out), jnp.float32, -limit, limit),
            "bias": jnp.zeros((fan_out,), jnp.float32),
        }
    return params


def logits_fn(params, x):
    """The MLP's logits: ReLU after every layer but the last."""
    layers = [params[f"dense_{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def loss_fn(params, x, y):
    """Mean softmax cross-entropy over the (global) batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def accuracy(params, x, y):
    """Fraction of rows whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits_fn(params, x), axis=-1) == y)


def global_array(host, sharding):
    """A global jax.Array from a host array every process holds whole (each takes its shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """NumPy copies of replicated arrays (every process holds them whole)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def bytes_per_device(tree):
    """The most bytes any one local device holds of the arrays in ``tree``."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def checksum(params):
    """A float64 sum of |p| over all params: a short fingerprint to compare runs by eye."""
    return float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in jax.tree.leaves(params)))


def train(tx, mesh, data, *, epochs, batch_size, seed=0, zero1=False, max_steps=None, log=print):
    """Trains the MLP data-parallel over ``mesh`` (axis "data") and returns the final params.

    Every process computes the same shuffles from ``seed`` and feeds its own shards of each
    global batch, so the run is the same whatever the number of processes and devices.

    Args:
      tx: The optax transformation (for example ``adamx.adam(1e-3)``).
      mesh: A mesh with a "data" axis; the global batch is split over it.
      data: A ``_common.Dataset``.
      epochs: Passes over the training rows (the last partial batch is dropped).
      batch_size: Global batch size; a multiple of the "data" axis size.
      seed: Seed of the init and of the shuffles.
      zero1: Split the optimizer state over "data" (ZeRO-1) instead of replicating it.
      max_steps: Stop after this many steps in all (None: run every epoch).
      log: Called with each line to print.

    Returns:
      The final params as a pytree of NumPy arrays.

    Raises:
      RunError: when an epoch's mean training loss is inf or NaN.
    """
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    sizes = (data.x_train.shape[1], *data.hidden, data.num_classes)
    params = jax.device_put(init_mlp(jax.random.key(seed), sizes), replicated)
    abstract_state = jax.eval_shape(tx.init, params)
    if zero1:
        state_shardings = adamx.zero1_shardings(abstract_state, mesh)
    else:
        state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    log(f"devices: {jax.device_count()} in {jax.process_count()} process(es); "
        f"optimizer state per device: {bytes_per_device(state)} bytes")

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    step = jax.jit(step, out_shardings=(replicated, state_shardings, replicated),
                   donate_argnums=(0, 1))
    evaluate = jax.jit(lambda params, x, y: (loss_fn(params, x, y), accuracy(params, x, y)),
                       out_shardings=replicated)
    x_test, y_test = (global_array(a, replicated) for a in (data.x_test, data.y_test))
    rng = np.random.default_rng(seed)
    num_batches = len(data.x_train) // batch_size
    taken = 0
    for epoch in range(1, epochs + 1):
        start, losses = time.perf_counter(), []
        order = rng.permutation(len(data.x_train))
        for b in range(num_batches):
            if max_steps is not None and taken == max_steps:
                break
            index = order[b * batch_size:(b + 1) * batch_size]
            x, y = global_array(data.x_train[index], rows), global_array(data.y_train[index], rows)
            params, state, loss = step(params, state, x, y)
            losses.append(loss)
            taken += 1
        if not losses:
            break
        test_loss, test_accuracy = to_host(evaluate(params, x_test, y_test))
        train_loss = float(np.mean(to_host(losses)))
        log(f"epoch {epoch}: loss {train_loss:.4f} - test loss "
            f"{test_loss:.4f} - test accuracy {test_accuracy:.4f} - "
            f"{time.perf_counter() - start:.2f}s")
        check_finite_loss(train_loss, epoch)
    return to_host(params)


def split_address(text):
    """(host, port) of `host:port` (`[::1]:port` for IPv6), the port in [1, 65535]; else None.

    >>> split_address("127.0.0.1:8476"), split_address("nonsense"), split_address("host:0")
    (('127.0.0.1', 8476), None, None)
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (colon and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return host, int(port)


def coordinator_address(text):
    """Parses --coordinator: `host:port`, kept as the string `jax.distributed.initialize` takes."""
    if split_address(text) is None:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port in [1, 65535], got {text!r}")
    return text


def check_coordinator(address, process_id, timeout):
    """Raises RunError, within about `timeout` seconds, where JAX could not reach the coordinator.

    `jax.distributed.initialize` does not raise for that: once its `initialization_timeout` runs
    out, its client ends the whole process with a C++ fatal error and stack trace. So the usual
    causes are caught here first: a host that does not resolve; for process 0, which serves the
    coordinator, an address that is not this machine's or a port already taken; for the others, a
    port where nothing accepts a connection (process 0 starting late is waited for).
    """
    host, port = split_address(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise RunError(f"--coordinator {address}: cannot resolve {host!r} ({error.strerror})") from None
    if process_id == 0:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(where)
            except OSError as error:
                raise RunError(f"--coordinator {address}: process 0 serves the coordinator but "
                               f"cannot listen there ({error.strerror})") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(where[:2], timeout=max(deadline - time.monotonic(), 0.1)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RunError(f"--coordinator {address}: nothing answered within {timeout} s "
                               f"({error.strerror or error}); is process 0 running?") from None
        time.sleep(0.2)


def parse_args(argv):
    """Parses the command line; returns (parser, args)."""
    parser = OneLineParser(prog="data_parallel.py", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="global batch size: a multiple of the device count, at most the "
                             "number of training rows (default 128)")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-2)
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="in [0, 2**32 - 1]: init and data order (default 0)")
    parser.add_argument("--zero1", action="store_true",
                        help="shard the Adam moments over the data axis (ZeRO-1)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="stop after this many steps in all")
    # JAX takes the process count as a C++ int, and its coordinator keeps state for each process
    # (2**31 - 1 of them never starts): 65536 is far more processes than this example needs.
    parser.add_argument("--num-processes", type=int_in_range(1, MAX_PROCESSES), default=1,
                        help=f"in [1, {MAX_PROCESSES}] (default 1)")
    parser.add_argument("--process-id", type=integer, default=0,
                        help="in [0, --num-processes) (default 0)")
    parser.add_argument("--coordinator", default=None, type=coordinator_address,
                        help="host:port of process 0, the port in [1, 65535], e.g. 127.0.0.1:12355")
    parser.add_argument("--timeout", metavar="SECONDS", type=int_in_range(1, 3600), default=None,
                        help="in [1, 3600]: how long each process waits for the coordinator and "
                             f"the others (default {DEFAULT_TIMEOUT_S}); JAX itself ends a "
                             "process 0 whose others never joined")
    parser.add_argument("--save", default=None, metavar="FILE.npz", type=output_file(".npz"),
                        help="process 0 writes the final params to this .npz file")
    args = parser.parse_args(argv)
    if args.num_processes > 1 and args.coordinator is None:
        parser.error("--coordinator is required with --num-processes > 1")
    for flag, value in (("--coordinator", args.coordinator), ("--timeout", args.timeout)):
        if args.num_processes == 1 and value is not None:
            parser.error(f"{flag} applies only with --num-processes > 1")
    if not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    return parser, args


def main(argv=None):
    """Runs the example; returns the final params (NumPy arrays).

    Raises:
        SystemExit: with status 2 and one line on stderr, for a bad flag, a batch size the device
            count does not divide or larger than the data, a coordinator that cannot be reached,
            or a training loss that becomes inf or NaN.
    """
    parser, args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except RunError as error:
        parser.error(str(error))


def run(args):
    """Trains as the flags say (after joining the other processes); returns the final params."""
    if args.num_processes > 1:
        timeout = args.timeout or DEFAULT_TIMEOUT_S
        check_coordinator(args.coordinator, args.process_id, timeout)
        # CPU devices of different processes talk through gloo; set before the backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   initialization_timeout=timeout)
    if args.batch_size % jax.device_count():
        raise RunError(f"--batch-size must be a multiple of the {jax.device_count()} devices, "
                       f"got {args.batch_size}")
    data = load_task("digits")
    if args.batch_size > len(data.x_train):
        # The last partial batch is dropped, so a larger batch would train nothing.
        raise RunError(f"--batch-size must be at most the {len(data.x_train)} training rows, "
                       f"got {args.batch_size}")
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with jax.set_mesh(mesh):
        params = train(adamx.adam(args.learning_rate), mesh, data,
                       epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                       zero1=args.zero1, max_steps=args.steps)
    print(f"params checksum: {checksum(params):.10e}")
    if args.save is not None and jax.process_index() == 0:
        flat = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        try:
            np.savez(args.save, **flat)
        except OSError as error:
            raise RunError(f"--save: cannot write {args.save!r}: {error.strerror}") from None
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return params


if __name__ == "__main__":
    main()
