"""The CPU kernels of ``adamx/_ffi/adam_step.cc``: building, registering, and the moment update.

Two XLA FFI custom calls share one C++ file. ``adam_step`` is the whole step, params and moments
in place, behind :func:`adamx.apply`. ``adam_moments`` updates only the two moments of every
float32 leaf, in place, in one multithreaded pass; :func:`moments` puts it under the Optax
protocol, where XLA fuses the rest of the update into ``optax.apply_updates``: the step reads g,
m, v, p and writes m, v, p (36 bytes per parameter, against 40 for three loop fusions a leaf) and
compiles one loop fusion per leaf instead of three.

The kernels run when the process's default backend is CPU with a single device (:func:`kernel_here`);
GPU and TPU keep the plain JAX path, where XLA fuses well, and so do several devices, as the
custom calls have no sharding rule. :func:`moments` differentiates and vectorizes through the plain
JAX moment update (``jax.custom_jvp``, ``jax.custom_batching.custom_vmap``), so ``jax.grad`` and
``jax.vmap`` of an update see the same math as without the kernel. Both kernels compute what the
plain path computes, operation for operation in float32; results agree to an ulp or so, where
GCC and XLA's LLVM contract a multiply-add into an FMA differently.

The library is compiled with the machine's ``g++`` (or ``$CXX``) on first use into a cache
directory (``$ADAMX_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamx``, else ``~/.cache/adamx``),
keyed by a hash of its source, the compiler flags, the FFI headers and the host CPU (the build
uses ``-march=native``, so a cache shared with an older CPU must not load it). Nothing is
compiled at install or import time; ``ADAMX_DISABLE_KERNEL=1`` keeps everything on the plain JAX
path.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).parent / "_ffi" / "adam_step.cc"
# FFI target name -> symbol in the built library.
STEP_TARGET = "adamx_adam_step_f32"
MOMENTS_TARGET = "adamx_adam_moments_f32"
_TARGETS = {STEP_TARGET: "AdamxAdamStepF32", MOMENTS_TARGET: "AdamxAdamMomentsF32"}
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17",
          "-shared", "-fPIC")
# Elements per work item handed to a thread: large enough to amortize scheduling.
CHUNK = 1 << 16
# Leaves per custom call: XLA's compile time grows faster than linearly in the aliased operands
# of one call (1,000 leaves in one call took minutes), so big trees are split into a few calls.
GROUP = 64


def _cache_dir():
    if "ADAMX_CACHE_DIR" in os.environ:
        return Path(os.environ["ADAMX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adamx"


def _host_cpu():
    """The machine and its instruction-set flags, for the cache key of a -march=native build."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(cxx):
    """Compiles the kernel into the cache (once per source, flags and jaxlib); returns its path."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join((cxx,) + _FLAGS).encode())
    key.update(_host_cpu().encode())
    for header in sorted(Path(jax.ffi.include_dir()).rglob("*.h")):
        key.update(header.read_bytes())
    lib = _cache_dir() / f"adam_step_{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, lib)  # atomic: a concurrent process sees the old state or the whole file
    return lib


@functools.lru_cache(maxsize=None)
def _kernel_status():
    """(True, "") once the kernel is built and registered for CPU, else (False, the reason)."""
    if os.environ.get("ADAMX_DISABLE_KERNEL", "").lower() in ("1", "true", "yes"):
        return False, "ADAMX_DISABLE_KERNEL is set"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not found)"
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return False, f"building the kernel failed: {detail.strip()[:500]}"
    return True, ""


def kernel_available():
    """Whether the fused CPU kernel can be used here (building it on first call if needed).

    Returns:
      True when the kernels are compiled and registered for XLA:CPU. Set
      ``ADAMX_DISABLE_KERNEL=1`` before the first call to keep :func:`adamx.apply` and the
      Optax-protocol update on the plain JAX path.

    Example:
      >>> import adamx
      >>> isinstance(adamx.kernel_available(), bool)
      True
    """
    return _kernel_status()[0]


_switched_off = 0


@contextlib.contextmanager
def switched_off():
    """Steps traced inside this block take the plain JAX path (the tests' oracle, the benchmark's
    baseline); the choice is made at trace time, so a jit traced here keeps it."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def kernel_here():
    """(usable, reason): the kernel is built and this process compiles for CPU.

    A process whose default backend is a GPU or TPU keeps the plain JAX path, where XLA fuses well.
    """
    if _switched_off:
        return False, "switched off (adamx._kernel.switched_off)"
    if jax.default_backend() != "cpu":
        return False, f"the default backend is {jax.default_backend()}, not cpu"
    if jax.device_count() > 1:
        # The custom call has no sharding rule: XLA would gather every sharded leaf around it.
        return False, f"{jax.device_count()} devices: the kernel has no sharding rule"
    return _kernel_status()


def is_f32(x):
    return isinstance(x, (jax.Array, np.ndarray)) and x.dtype == jnp.float32


def _plain_moments(scalars, gs, ms, vs):
    """The moment update of ``adamx/_update.py``, op for op: the kernel's oracle and derivative."""
    b1, omb1, b2, omb2 = (scalars[i] for i in range(4))
    new_m, new_v = [], []
    for g, m, v in zip(gs, ms, vs):
        new_m.append(omb1 * g + b1 * m)
        new_v.append(omb2 * jnp.square(g) + b2 * v)
    return tuple(new_m), tuple(new_v)


def _moments_call(scalars, gs, ms, vs):
    """The custom calls, ``GROUP`` leaves each; moments are updated in place (aliased)."""
    new_m, new_v = [], []
    for start in range(0, len(gs), GROUP):
        group = range(start, min(start + GROUP, len(gs)))
        operands = [scalars]
        for k in group:
            operands += [gs[k], ms[k], vs[k]]
        result_types = [jax.ShapeDtypeStruct(np.shape(gs[k]), jnp.float32)
                        for k in group for _ in range(2)]
        # Operands 2 + 3j (m) and 3 + 3j (v) become results 2j and 2j + 1.
        aliases = {}
        for j in range(len(group)):
            aliases.update({2 + 3 * j: 2 * j, 3 + 3 * j: 2 * j + 1})
        call = jax.ffi.ffi_call(MOMENTS_TARGET, result_types, input_output_aliases=aliases)
        out = call(*operands, chunk=np.int64(CHUNK))
        new_m += out[0::2]
        new_v += out[1::2]
    return tuple(new_m), tuple(new_v)


@jax.custom_batching.custom_vmap
def _kernel_moments(scalars, gs, ms, vs):
    return _moments_call(scalars, gs, ms, vs)


@_kernel_moments.def_vmap
def _kernel_moments_vmap(axis_size, in_batched, scalars, gs, ms, vs):
    del axis_size
    # Under vmap, the plain moment update, vectorized as JAX vectorizes it.
    in_axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
    out = jax.vmap(_plain_moments, in_axes=in_axes)(scalars, gs, ms, vs)
    return out, jax.tree.map(lambda _: True, out)


@jax.custom_jvp
def _moments(scalars, gs, ms, vs):
    return _kernel_moments(scalars, gs, ms, vs)


@_moments.defjvp
def _moments_jvp(primals, tangents):
    # Derivatives (and so jax.grad through an update) come from the plain path.
    return jax.jvp(_plain_moments, primals, tangents)


def moments(gs, ms, vs, *, b1, omb1, b2, omb2):
    """New (first, second) moments of float32 leaves, by the kernel: two tuples of arrays.

    ``gs``, ``ms``, ``vs`` are sequences of non-empty float32 arrays of matching shapes; the
    scalars are float32 0-d arrays as :func:`adamx._update.step_scalars` makes them. Results
    match the plain path to an ulp or so (bit for bit with constant hyperparameters, as measured
    in ``tests/test_fused.py``).
    """
    scalars = jnp.stack([b1, omb1, b2, omb2]).astype(jnp.float32)
    return _moments(scalars, tuple(gs), tuple(ms), tuple(vs))
