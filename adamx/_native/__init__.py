"""The optional whole-step Adam kernel for XLA:CPU: params and moments of many leaves updated in
place by one custom call.

The C++ beside this file is compiled when adamx is installed (``setup.py``), against the XLA FFI
headers of the build environment's jaxlib (``jax.ffi.include_dir()``), with portable flags and
one variant per x86-64 instruction set picked at run time; nothing is compiled, written or downloaded
at run time. Importing this package loads no native code: the compiled module ``_ext`` is
imported, checked and registered with XLA for the CPU platform on the first call of
:func:`status` or :func:`step`.

``abi.h`` is the one contract between this file and the C++: the operands, the step scalars, the
flag bits, each leaf's fields and the codes of its dtypes and formats. The compiled module
exports them all; :data:`ABI_VERSION` here must equal the module's, or the module is a stale
build and is refused.
"""

import functools
import importlib
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _formats

__all__ = ["ABI_VERSION", "GROUP", "MIN_JAXLIB", "Leaf", "status", "step"]

# The version of abi.h this file speaks; the compiled module's ABI_VERSION must be the same.
ABI_VERSION = 3
# The oldest jaxlib the kernel runs on. It is built against this release's XLA FFI headers (API
# 0.1; XLA refuses handlers built against a newer API than its own), and XLA:CPU of 0.5.3 to
# 0.7.1 aborts the process when it compiles a step (it parses the FFI attributes as JSON).
MIN_JAXLIB = (0, 7, 2)
# Leaves per custom call: XLA's compile time grows faster than linearly in the aliased operands
# of one call (1,000 leaves in one call took minutes), so big trees are split into a few calls.
GROUP = 64

_REINSTALL = (
    "reinstall adamx where a C++17 compiler (g++ or clang++) is on PATH: pip install "
    "--force-reinstall --no-deps <the adamx source you installed> (from a checkout: pip install "
    "-e .); pip's -v shows the compiler's output"
)
_FORMATS = {_formats.Int8Blocks: "int8_blocks", _formats.Int4Blocks: "int4_blocks",
            _formats.Int4Rank1: "int4_rank1"}
_lock = threading.Lock()


class Leaf(NamedTuple):
    """One leaf of a kernel step: its arrays as the state stores them, and how it steps.

    Attributes:
      param: float32 or bfloat16, not empty.
      grad: The gradient, of the param's shape and dtype.
      mu: A float32 or bfloat16 array of the param's shape, or an ``Int8Blocks`` (int8 codes) or
        ``Int4Blocks``.
      nu: A float32 or bfloat16 array, or an ``Int8Blocks`` (uint8 codes) or ``Int4Rank1``.
      compensation: Kahan's bfloat16 compensation where ``rounding`` is ``"kahan"``, else None.
      rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"``: how a bfloat16 param is written
        (``"nearest"`` for a float32 param).
      decay: Whether the leaf gets weight decay.
      keys: uint32[2], the keys of the random bits of its param and of its moments
        (``adamx._numerics.bits_key``).
    """

    param: jax.Array
    grad: jax.Array
    mu: Any
    nu: Any
    compensation: Optional[jax.Array]
    rounding: str
    decay: bool
    keys: jax.Array


def _import_ext():
    """The compiled module, or raises ImportError."""
    return importlib.import_module("adamx._native._ext")


def _release(version: str) -> tuple:
    """``(major, minor, patch)`` of a version string such as ``0.10.2`` or ``0.9.0.1``."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


@functools.lru_cache(maxsize=None)
def _load():
    """``(module, "")`` once the module is imported, speaks this ABI and is registered for CPU;
    ``(None, reason)`` otherwise."""
    import jaxlib

    if _release(jaxlib.__version__) < MIN_JAXLIB:
        return None, (f"adamx's native kernel needs jaxlib >= {'.'.join(map(str, MIN_JAXLIB))}, "
                      f"and jaxlib {jaxlib.__version__} is installed: XLA:CPU before 0.7.2 reads "
                      "the kernel's attributes as a JSON backend config and aborts the process "
                      "when it compiles the step")
    try:
        ext = _import_ext()
    except ModuleNotFoundError:
        return None, ("adamx was installed without its native kernel (no C++ compiler at install "
                      f"time, or the build failed); {_REINSTALL}")
    except ImportError as e:
        return None, f"adamx's native kernel is installed but does not load ({e}); {_REINSTALL}"
    if getattr(ext, "ABI_VERSION", None) != ABI_VERSION:
        return None, (f"adamx's native kernel was built from another version of adamx (ABI "
                      f"{getattr(ext, 'ABI_VERSION', 1)}, this adamx speaks {ABI_VERSION}: a "
                      f"stale build); {_REINSTALL}")
    # With the CPU client already made, jaxlib registers at once and raises here if it refuses
    # the handler; registered before, the refusal would come when the client is made, and no
    # CPU computation could run in this process.
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
                      f"It was built against XLA FFI API {major}.{minor}; jaxlib "
                      f"{jaxlib.__version__} is installed; {_REINSTALL}")
    return ext, ""


def status() -> tuple[bool, str]:
    """Whether the native kernel can run in this process, and if not, why.

    The first call imports the compiled module and registers its handler with XLA for the
    ``"cpu"`` platform; later calls return the same answer.

    Returns:
      ``(True, "")`` when the kernel is built, speaks this ABI and is registered; else
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


def _format(moment: Any) -> tuple[str, tuple, int]:
    """A moment's format name (abi.h), its arrays in operand order, and its block length."""
    if _formats.is_quantized(moment):
        size = int(np.prod(moment.leaf_shape))
        block = 0 if isinstance(moment, _formats.Int4Rank1) else (
            _formats.block_length(size, moment.absmax.shape[0]))
        return _FORMATS[type(moment)], tuple(moment), block
    return jnp.dtype(moment.dtype).name, (moment,), 0


def step(scalars: Mapping[str, jax.Array], leaves: Sequence[Leaf], *, maximize: bool,
         eps_hat: bool, nesterov: bool, isa: Optional[str] = None) -> list[tuple]:
    r"""One Adam step of many leaves by the native kernel, in place where the caller donates.

    Computes abi.h's step: per element, with ``g`` negated first when ``maximize``,

    .. math::

      m' = \mathrm{omb1}\, g + \mathrm{b1}\, m, \qquad
      v' = \mathrm{omb2}\, g^2 + \mathrm{b2}\, v, \\
      \hat m = \mathrm{nesterov\_m}\, m' + \mathrm{nesterov\_g}\, g \text{ if nesterov, else }
        m' \cdot \mathrm{inv\_bc1}, \\
      d = \hat m \cdot \frac{\mathrm{step\_scale}}{\sqrt{v' + \epsilon_{root}} + \epsilon}
        \text{ if eps\_hat, else } \frac{\hat m}{\sqrt{v' \cdot \mathrm{inv\_bc2} + \epsilon_{root}}
        + \epsilon}, \\
      p' = p + \mathrm{scale}\, (d + \mathrm{weight\_decay}\; p \text{ where decay}),

    the moments stored in their formats (quantized ones rounded stochastically) and a bfloat16
    param written by its rounding. Every ``GROUP`` leaves make one custom call whose results
    alias its operands, so under ``jax.jit`` with those buffers donated the step writes them in
    place (without donation XLA copies them first). It has no derivative rule; under
    ``jax.vmap`` it runs once per batch element. The caller (``adamx.apply``) has checked the
    leaves: this only packs them.

    Args:
      scalars: The float32 step scalars by the names of the module's ``SCALARS``
        (``adamx._fused.kernel_scalars``).
      leaves: The :class:`Leaf` of each non-empty leaf.
      maximize: Ascend instead of descend (negate ``g``).
      eps_hat: Use :math:`\hat\epsilon` inside the bias correction (Keras / TensorFlow form).
      nesterov: Use Nesterov momentum (NAdam).
      isa: The instruction-set variant to run, one of the module's ``SUPPORTED_ISAS``; None for
        the widest (tests compare the variants).

    Returns:
      ``(param, mu, nu, compensation)`` per leaf, new, in the order of ``leaves``.

    Raises:
      RuntimeError: If the kernel is unavailable (the message is :func:`status`'s reason).

    Example:
      >>> import jax.numpy as jnp
      >>> from adamx import _native
      >>> s = {k: jnp.float32(0.0) for k in _native._import_ext().SCALARS}
      >>> s.update(scale=jnp.float32(-0.1), omb1=jnp.float32(1.0), omb2=jnp.float32(1.0),
      ...          inv_bc1=jnp.float32(1.0), inv_bc2=jnp.float32(1.0))
      >>> x = jnp.array([1.0, -2.0])
      >>> leaf = _native.Leaf(x, jnp.array([0.5, -0.5]), 0 * x, 0 * x, None, "nearest", False,
      ...                     jnp.zeros(2, jnp.uint32))
      >>> [(p, m, v, c)] = _native.step(s, [leaf], maximize=False, eps_hat=False, nesterov=False)
      >>> p
      Array([ 0.9, -1.9], dtype=float32)
    """
    ok, why = status()
    if not ok:
        raise RuntimeError(f"adamx._native.step: the native kernel is unavailable: {why}")
    ext = _load()[0]
    options = {"maximize": maximize, "eps_hat": eps_hat, "nesterov": nesterov}
    flags = sum(bit for name, bit in ext.FLAGS.items() if options[name])
    vector = jnp.stack([jnp.asarray(scalars[k], jnp.float32) for k in ext.SCALARS])
    results = []
    for start in range(0, len(leaves), GROUP):
        group = leaves[start:start + GROUP]
        operands = [vector, jnp.concatenate([leaf.keys for leaf in group])]
        fields, result_types, aliases, shapes = [], [], {}, []
        for leaf in group:
            (mu_format, mu_arrays, mu_block), (nu_format, nu_arrays, nu_block) = (
                _format(leaf.mu), _format(leaf.nu))
            values = {"param": ext.PARAM_DTYPES[jnp.dtype(leaf.param.dtype).name],
                      "rounding": ext.ROUNDINGS[leaf.rounding],
                      "mu": ext.MOMENT_FORMATS[mu_format][0], "nu": ext.MOMENT_FORMATS[nu_format][0],
                      "decay": int(leaf.decay), "mu_block": mu_block, "nu_block": nu_block}
            fields += [values[name] for name in ext.LEAF_FIELDS]
            written = [leaf.param, *mu_arrays, *nu_arrays]
            if leaf.compensation is not None:
                written.append(leaf.compensation)
            # The operands are p, g, then the rest of the written arrays; each written array
            # aliases its result.
            operands += [leaf.param, leaf.grad, *written[1:]]
            for j, x in enumerate(written):
                aliases[len(operands) - len(written) - 1 + j + (j > 0)] = len(result_types)
                result_types.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype))
            shapes.append((leaf, len(mu_arrays), len(nu_arrays), len(written)))
        call = jax.ffi.ffi_call(ext.TARGET, result_types, input_output_aliases=aliases,
                                vmap_method="sequential")
        out = call(*operands, flags=np.int64(flags), leaves=np.asarray(fields, np.int64),
                   isa=np.int64(-1 if isa is None else list(ext.ISAS).index(isa)))
        offset = 0
        for leaf, n_mu, n_nu, n in shapes:
            new = out[offset:offset + n]
            offset += n
            results.append((new[0], _like(leaf.mu, new[1:1 + n_mu]),
                            _like(leaf.nu, new[1 + n_mu:1 + n_mu + n_nu]),
                            new[-1] if leaf.compensation is not None else None))
    return results


def _like(moment: Any, arrays: Sequence[jax.Array]) -> Any:
    """``arrays`` in the form of ``moment``: a quantized moment of the same format, or the array."""
    return type(moment)(*arrays) if _formats.is_quantized(moment) else arrays[0]
