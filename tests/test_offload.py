"""Host offload: the moments live in host memory between steps, and the results are the bits of
the run without offload (the oracle: the same step with the state in device memory).

CPU devices have ``pinned_host`` and ``unpinned_host`` memories, which is enough to prove where the
state lives and that the step computes the same thing; what offload saves on a GPU is measured by
a benchmark, not here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.helpers import grad_sequence, nested_params

# XLA:CPU keeps arrays in pinned host memory inside a jitted step from jaxlib 0.10.2; before,
# adamx.update refuses a host-resident state rather than silently moving it to device memory.
OFFLOAD = adamx._sharding.jit_keeps_pinned_host("cpu")
REFUSED = r"host offload on CPU needs jaxlib >= 0\.10\.2"

TRANSFORMS = {
    "adamw": lambda: adamx.adamw(1e-2, weight_decay=0.1),
    "amsgrad_bf16_mu": lambda: adamx.amsgrad(1e-2, mu_dtype=jnp.bfloat16),
    "kahan": lambda: adamx.adam(1e-2, param_rounding="kahan"),
}


def offload(state):
    """The state with its moments in pinned host memory: placed by adamx.host_offload_shardings
    where XLA keeps them there in a step; by hand where it does not (adamx refuses to plan it)."""
    if OFFLOAD:
        return jax.device_put(state, adamx.host_offload_shardings(state))
    with pytest.raises(ValueError, match=REFUSED):
        adamx.host_offload_shardings(state)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    return state._replace(**{name: jax.device_put(getattr(state, name), host)
                             for name in ("mu", "nu", "nu_max", "compensation")
                             if getattr(state, name) is not None})


def memory_kinds(state):
    return {name: {x.sharding.memory_kind for x in jax.tree.leaves(getattr(state, name))}
            for name in ("count", "mu", "nu", "nu_max", "compensation")
            if getattr(state, name) is not None}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_offloaded_state_stays_on_the_host_and_steps_bitwise_like_the_device_state(name):
    memory_kind = "pinned_host"
    tx = TRANSFORMS[name]()
    params = nested_params()
    params["half"] = jnp.linspace(-1, 1, 10, dtype=jnp.bfloat16)
    state = tx.init(params)
    offloaded = offload(state)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if not OFFLOAD:
        with pytest.raises(ValueError, match=REFUSED):
            step(params, offloaded, next(iter(grad_sequence(params, 1))))
        return
    want, got = (params, state), (params, offloaded)
    for grads in grad_sequence(params, 4):
        want = step(*want, grads)
        got = step(*got, grads)
        kinds = memory_kinds(got[1])
        assert kinds.pop("count") == {"device"}
        assert all(k == {memory_kind} for k in kinds.values()), kinds
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the compiled step takes and returns the moments in host memory
    text = step.lower(params, offloaded, grads).as_text()
    assert text.count(f'mhlo.memory_kind = "{memory_kind}"') >= 2 * len(jax.tree.leaves(params))


def test_an_eager_update_of_an_offloaded_state_matches_too():
    params = {"w": jnp.linspace(-1, 1, 6)}
    tx = adamx.adam(1e-2)
    state = tx.init(params)
    offloaded = offload(state)
    grads = {"w": jnp.cos(params["w"])}
    if not OFFLOAD:
        with pytest.raises(ValueError, match=REFUSED):
            tx.update(grads, offloaded, params)
        return
    u1, s1 = tx.update(grads, state, params)
    u2, s2 = tx.update(grads, offloaded, params)
    np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))
    assert s2.mu["w"].sharding.memory_kind == "pinned_host"


@pytest.mark.parametrize("wrap", ["chain", "inject_hyperparams"])
def test_offload_finds_the_adam_state_inside_a_chain_or_inject_hyperparams(wrap):
    params = {"w": jnp.ones((4, 3))}
    if wrap == "chain":
        tx = optax.chain(optax.clip_by_global_norm(1.0), adamx.adam(1e-2))
    else:
        tx = optax.inject_hyperparams(adamx.adam)(learning_rate=1e-2)
    state = tx.init(params)
    if not OFFLOAD:
        with pytest.raises(ValueError, match=REFUSED):
            adamx.host_offload_shardings(state)
        return
    shardings = adamx.host_offload_shardings(state)
    inner = shardings[1] if wrap == "chain" else shardings.inner_state
    assert inner.mu["w"].memory_kind == inner.nu["w"].memory_kind == "pinned_host"
    outside = [s.memory_kind for s in jax.tree.leaves(shardings)
               if s not in (inner.mu["w"], inner.nu["w"])]
    assert outside and set(outside) == {"device"}
    offloaded = jax.device_put(state, shardings)
    step = jax.jit(tx.update)
    got, _ = step(params, offloaded, params)
    want, _ = step(params, state, params)
    np.testing.assert_array_equal(got["w"], want["w"])
