"""Training with quantized moments against the float64 oracle: the problem, the runs and the
comparison that ``tests/test_quantize_training.py`` and its float64 subprocess share.

The oracle is ``tests/reference.py``'s float64 Adam whose big leaves' moments go through
``tests/quantize_oracle.py`` after each step, stochastically rounded on the documented random bits
of (seed 0, step, leaf): the update is computed from the moments before they are stored, and the
stored ones are what the next step reads.
"""

import jax.numpy as jnp
import numpy as np

from tests import helpers
from tests import quantize_oracle as oracle
from tests.reference import ReferenceAdam

LR = 1e-2


class QuantizedReference(ReferenceAdam):
    """Float64 Adam whose moments of leaves of 4,096 elements or more are stored quantized."""

    def __init__(self, params, spec, keys, **options):
        super().__init__([(np.shape(p), False) for p in params], lr=LR, **options)
        self.spec, self.big, self.keys = spec, [np.size(p) >= 4096 for p in params], keys

    def roundtrip(self, x, signed, u):
        if self.spec == "int8":
            table = oracle.SIGNED8 if signed else oracle.UNSIGNED8
            return oracle.roundtrip_blocks(x, 256, table, u, no_zero=not signed)
        if signed:
            return oracle.roundtrip_blocks(x, 32, oracle.SQUARE4, u, scale_up=oracle.bfloat16_up)
        return oracle.roundtrip_rank1(x, u)

    def step(self, grads, params):
        out = super().step(grads, params)
        for i in np.flatnonzero(self.big):
            u_m, u_v = oracle.moment_uniforms(np.shape(self.m[i]), 0, self.t, self.keys[i])
            self.m[i] = self.roundtrip(self.m[i], True, u_m)
            self.v[i] = self.roundtrip(self.v[i], False, u_v)
            self.v_max[i] = self.roundtrip(self.v_max[i], False, u_v)
        return out


def problem(dtype=jnp.float32, steps=6, seed=0):
    """A quantized leaf (72 x 64) beside a small float32 one, and gradients over 4 decades."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(72, 64)), dtype),
              "b": jnp.asarray(rng.normal(size=(64,)), dtype)}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 0, v.shape), dtype)
              for k, v in params.items()} for _ in range(steps)]
    return params, grads


def run(tx, params, grads):
    """The updates of each step of ``tx`` over ``grads``, and the last state."""
    history, _, state = helpers.run(helpers.optax_step(tx, record="updates"), params,
                                    tx.init(params), grads)
    return history, state


def run_oracle(params, grads, spec, **options):
    names = sorted(params)
    opt = QuantizedReference([params[k] for k in names], spec, [f"['{k}']" for k in names],
                             **options)
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    history = []
    for g in grads:
        updates = opt.step([np.asarray(g[k], np.float64) for k in names],
                           [params[k] for k in names])
        params = {k: params[k] + u for k, u in zip(names, updates)}
        history.append(dict(zip(names, updates)))
    return history


def assert_updates_match(got, want, dtype):
    """Per-step updates agree to the param dtype's rounding, but for rare elements one code apart.

    adamx rounds float32 moments, the oracle float64 ones, on the same random bits: an element
    within float32 rounding of a decision may take the other code, which moves its later steps.
    """
    for g, w in zip(got, want):
        for k in w:
            a, b = np.asarray(g[k], np.float64), w[k]
            rtol = max(float(jnp.finfo(dtype).eps), 1e-5)
            close = np.abs(a - b) <= rtol * np.abs(b) + 1e-4 * LR
            assert np.mean(close) > 0.995, (k, np.mean(close))
            assert np.all(np.abs(a - b) <= 1.5 * LR)
