"""The optional whole-step Adam kernel for XLA:CPU: params and both moments of many float32 leaves
updated in place by one custom call.

The C++ beside this file is compiled when adamx is installed (``setup.py``), against the XLA FFI
headers of ``jax.ffi.include_dir()``, with portable flags and one variant per x86-64 instruction
set picked at run time; nothing is compiled, written or downloaded at run time. Importing this
package loads no native code: the compiled module ``_ext`` is imported, checked against ``abi.h``
and registered with XLA for the CPU platform on the first call of :func:`status` or :func:`step`.

``abi.h`` is the one contract between this file and the C++: the order of the step scalars, the
flag bits and the operands. :data:`SCALARS` is read from the compiled module (or from ``abi.h``
when the module is not built), and :func:`status` refuses a module whose ABI differs from the
header (a stale build).
"""

import functools
import importlib
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GROUP", "SCALARS", "status", "step"]

# Leaves per custom call: XLA's compile time grows faster than linearly in the aliased operands
# of one call (1,000 leaves in one call took minutes), so big trees are split into a few calls.
GROUP = 64

_ABI_HEADER = Path(__file__).with_name("abi.h")
_REINSTALL = (
    "reinstall adamx where a C++17 compiler (g++ or clang++) is on PATH, building against the "
    "installed jaxlib: pip install --force-reinstall --no-deps --no-build-isolation <the adamx "
    "source you installed> (from a checkout: pip install --no-build-isolation -e .); "
    "pip's -v shows the compiler's output"
)
_lock = threading.Lock()


def header_abi():
    """``(scalars, flags)`` as ``abi.h`` defines them: the scalar names in order, {flag: bit}."""
    text = _ABI_HEADER.read_text()

    def entries(macro):
        body = re.search(rf"#define {macro}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text).group(1)
        return re.findall(r"X\((\w+)(?:,\s*(\d+))?\)", body)

    scalars = tuple(name for name, _ in entries("ADAMX_STEP_SCALARS"))
    flags = {name: 1 << int(bit) for name, bit in entries("ADAMX_STEP_FLAGS")}
    return scalars, flags


def _import_ext():
    """The compiled module, or raises ImportError."""
    return importlib.import_module("adamx._native._ext")


def __getattr__(name):
    if name == "SCALARS":
        try:
            return tuple(_import_ext().SCALARS)
        except ImportError:
            return header_abi()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _load():
    """``(module, "")`` once the module is imported, matches abi.h and is registered for CPU;
    ``(None, reason)`` otherwise."""
    try:
        ext = _import_ext()
    except ModuleNotFoundError:
        return None, ("adamx was installed without its native kernel (no C++ compiler at install "
                      f"time, or the build failed); {_REINSTALL}")
    except ImportError as e:
        return None, f"adamx's native kernel is installed but does not load ({e}); {_REINSTALL}"
    scalars, flags = header_abi()
    if tuple(ext.SCALARS) != scalars or dict(ext.FLAGS) != flags:
        return None, ("adamx's native kernel was built from another version of abi.h (a stale "
                      f"build: scalars {tuple(ext.SCALARS)}, flags {dict(ext.FLAGS)}; abi.h has "
                      f"{scalars}, {flags}); {_REINSTALL}")
    import jaxlib

    # With the CPU client already made, jaxlib registers at once and raises here if it refuses
    # the handler (an FFI API version it does not support); registered before, the refusal
    # would come when the client is made, and no CPU computation could run in this process.
    try:
        jax.devices("cpu")
    except RuntimeError as e:
        return None, f"XLA's CPU backend is unavailable in this process ({e})"
    try:
        for name, capsule in ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as e:  # noqa: BLE001 - jaxlib raises its own error types here
        major, minor = ext.FFI_API_VERSION
        return None, (f"registering adamx's native kernel with XLA failed: {str(e).rstrip('.')}. "
                      f"It was built against jaxlib {ext.JAXLIB_VERSION} (XLA FFI API "
                      f"{major}.{minor}); jaxlib {jaxlib.__version__} is installed; {_REINSTALL}")
    return ext, ""


def status() -> tuple[bool, str]:
    """Whether the native kernel can run in this process, and if not, why.

    The first call imports the compiled module and registers its handler with XLA for the
    ``"cpu"`` platform; later calls return the same answer.

    Returns:
      ``(True, "")`` when the kernel is built, matches ``abi.h`` and is registered; else
      ``(False, reason)``, the reason saying what to do.

    Example:
      >>> from adamx import _native
      >>> ok, why = _native.status()
      >>> ok or bool(why)
      True
    """
    with _lock:
        ext, why = _load()
    return ext is not None, why


def _check_scalars(fn, scalars, names):
    if not isinstance(scalars, Mapping):
        raise TypeError(f"{fn}: scalars must be a mapping of name to array, got "
                        f"{type(scalars).__name__}")
    missing = [k for k in names if k not in scalars]
    extra = sorted(str(k) for k in scalars if k not in names)
    if missing or extra:
        raise ValueError(f"{fn}: scalars must have exactly the keys {names}; missing {missing}, "
                         f"extra {extra}")
    for k in names:
        x = scalars[k]
        if np.ndim(x) != 0 or jnp.result_type(x) != jnp.float32:
            raise ValueError(f"{fn}: scalars[{k!r}] must be a float32 0-d array, got "
                             f"{jnp.result_type(x)} of shape {np.shape(x)}")


def _check_leaves(fn, leaves, decay):
    if len(decay) != len(leaves):
        raise ValueError(f"{fn}: decay must have one entry per leaf ({len(leaves)}), got "
                         f"{len(decay)}")
    for k, leaf in enumerate(leaves):
        if len(leaf) != 4:
            raise ValueError(f"{fn}: leaves[{k}] must be (p, g, m, v), got {len(leaf)} arrays")
        shapes = [np.shape(x) for x in leaf]
        dtypes = [jnp.result_type(x) for x in leaf]
        if any(d != jnp.float32 for d in dtypes) or len(set(shapes)) != 1:
            raise ValueError(f"{fn}: leaves[{k}] (p, g, m, v) must be float32 arrays of one "
                             f"shape, got {[str(d) for d in dtypes]} of shapes {shapes}")
        if not np.prod(shapes[0], dtype=int):
            raise ValueError(f"{fn}: leaves[{k}] is empty (shape {shapes[0]}); leave it out")
    for k, d in enumerate(decay):
        if not isinstance(d, (bool, np.bool_)):
            raise TypeError(f"{fn}: decay[{k}] must be a bool, got {d!r}")


def step(
    scalars: Mapping[str, jax.Array],
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: Sequence[bool],
    *,
    maximize: bool,
    eps_hat: bool,
    nesterov: bool,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    r"""One Adam step of float32 leaves by the native kernel, in place where the caller donates.

    Per element, with ``g`` negated first when ``maximize``:

    .. math::

      m' = \mathrm{omb1}\, g + \mathrm{b1}\, m, \qquad
      v' = \mathrm{omb2}\, g^2 + \mathrm{b2}\, v, \\
      \hat m = \mathrm{nesterov\_m}\, m' + \mathrm{nesterov\_g}\, g \text{ if nesterov, else }
        m' \cdot \mathrm{inv\_bc1}, \\
      d = \hat m \cdot \frac{\mathrm{step\_scale}}{\sqrt{v' + \epsilon_{root}} + \epsilon}
        \text{ if eps\_hat, else } \frac{\hat m}{\sqrt{v' \cdot \mathrm{inv\_bc2} + \epsilon_{root}}
        + \epsilon}, \\
      p' = p + \mathrm{scale}\, (d + \mathrm{weight\_decay}\; p \text{ where decay}),

    each operation one float32 IEEE operation in this order (``abi.h``). Every ``GROUP`` leaves
    make one custom call whose results alias its p, m and v operands, so under ``jax.jit`` with
    those buffers donated the step writes them in place (without donation XLA copies them first).
    It has no derivative rule; under ``jax.vmap`` it runs once per batch element.

    Args:
      scalars: Exactly the names of :data:`SCALARS`, each a float32 0-d array.
      leaves: ``(p, g, m, v)`` per leaf: non-empty float32 arrays of one shape per leaf.
      decay: Per leaf, whether it gets weight decay (Python bools).
      maximize: Ascend instead of descend (negate ``g``).
      eps_hat: Use :math:`\hat\epsilon` inside the bias correction (Keras / TensorFlow form).
      nesterov: Use Nesterov momentum (NAdam).

    Returns:
      ``(new_p, new_m, new_v)`` per leaf, in the order of ``leaves``.

    Raises:
      RuntimeError: If the kernel is unavailable (the message is :func:`status`'s reason).
      ValueError: If the scalar names differ from :data:`SCALARS` (naming the missing and
        extra ones), or a leaf is empty or not four float32 arrays of one shape.
      TypeError: If a flag or a decay entry is not a bool.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamx import _native
      >>> s = {k: jnp.float32(0.0) for k in _native.SCALARS}
      >>> s.update(scale=jnp.float32(-0.1), omb1=jnp.float32(1.0), omb2=jnp.float32(1.0),
      ...          inv_bc1=jnp.float32(1.0), inv_bc2=jnp.float32(1.0))
      >>> x = jnp.array([1.0, -2.0])
      >>> [(p, m, v)] = _native.step(s, [(x, jnp.array([0.5, -0.5]), 0 * x, 0 * x)], [False],
      ...                            maximize=False, eps_hat=False, nesterov=False)
      >>> p
      Array([ 0.9, -1.9], dtype=float32)
    """
    fn = "adamx._native.step"
    ok, why = status()
    if not ok:
        raise RuntimeError(f"{fn}: the native kernel is unavailable: {why}")
    ext = _load()[0]
    names = tuple(ext.SCALARS)
    options = {"maximize": maximize, "eps_hat": eps_hat, "nesterov": nesterov}
    for name, value in options.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    _check_scalars(fn, scalars, names)
    leaves = [tuple(leaf) for leaf in leaves]
    _check_leaves(fn, leaves, decay)
    flags = sum(bit for name, bit in ext.FLAGS.items() if options[name])
    vector = jnp.stack([jnp.asarray(scalars[k], jnp.float32) for k in names])
    results = []
    for start in range(0, len(leaves), GROUP):
        group = leaves[start:start + GROUP]
        operands = [vector]
        for leaf in group:
            operands += leaf
        result_types = [jax.ShapeDtypeStruct(np.shape(leaf[0]), jnp.float32)
                        for leaf in group for _ in range(3)]
        # Operands 1 + 4j (p), 3 + 4j (m) and 4 + 4j (v) are written in place as results
        # 3j, 3j + 1 and 3j + 2.
        aliases = {}
        for j in range(len(group)):
            aliases.update({1 + 4 * j: 3 * j, 3 + 4 * j: 3 * j + 1, 4 + 4 * j: 3 * j + 2})
        call = jax.ffi.ffi_call(ext.TARGET, result_types, input_output_aliases=aliases,
                                vmap_method="sequential")
        out = call(*operands, flags=np.int64(flags),
                   decay=np.asarray(decay[start:start + GROUP], np.int32))
        results += [tuple(out[3 * j: 3 * j + 3]) for j in range(len(group))]
    return results
