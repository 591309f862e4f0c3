"""One of the processes of tests/test_multiprocess.py: joins jax.distributed and trains the MLP.

    python tests/_workers/two_process_training.py RANK COORDINATOR STEPS LEARNING_RATE OUT.npz

Every process runs the same SPMD program over all devices of all processes (params and Adam state
replicated, each batch split over "data"), prints the device count, and writes its own copy of the
final params to OUT.npz, so the test can compare the processes with each other and with a
single-device oracle.
"""

import sys

import jax
import numpy as np

import adamx
import mlp  # beside this script, so on sys.path when it runs


def main():
    rank, coordinator, steps, learning_rate, out = sys.argv[1:]
    # CPU devices of different processes talk through gloo; set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                               process_id=int(rank))
    print(f"devices: {jax.device_count()} in {jax.process_count()} process(es)", flush=True)
    x, y = mlp.synthetic_data()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with jax.set_mesh(mesh):
        params = mlp.train(adamx.adam(float(learning_rate)), mesh, x, y, steps=int(steps))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(path): leaf for path, leaf in flat})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
