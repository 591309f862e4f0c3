"""Builds adamx: the Python package, and its optional native kernel at install time.

The kernel (``adamx/_native``) is compiled here, as JAX's own FFI example compiles its native
code: by the build backend, against the XLA FFI headers that jaxlib ships
(``jax.ffi.include_dir()``; jax is a build requirement in ``pyproject.toml``). XLA runs handlers
built against its own FFI API version or an older one, never a newer one: a kernel built against
a newer jaxlib than the one installed is refused when it registers, with the remedy (build
without isolation, against the installed jaxlib). The flags are portable: no ``-march=native``;
``-ffp-contract=off``, so that every instruction-set variant (which the kernel picks at run time)
computes the same IEEE operations in the same order and gives the same bits. The extension is
optional: without a C++17 compiler, or if the build fails, adamx installs without it, and
``adamx.kernel_available()`` is False with the reason at run time.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "adamx/_native"
# -fno-trapping-math lets the compiler vectorize selects between float values (it gives up floating-
# point exception flags, which nothing reads, and changes no value); no -ffast-math.
FLAGS = ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off",
         "-fno-math-errno", "-fno-trapping-math"]


class BuildNative(build_ext):
    """Compiles the kernel against jaxlib's FFI headers, or skips it with a visible warning."""

    def build_extension(self, ext):
        try:
            import jax.ffi

            include = jax.ffi.include_dir()
        except Exception as e:  # noqa: BLE001 - any failure only means "no kernel"
            self._skip(ext, f"jax.ffi.include_dir() is unavailable ({e})")
            return
        # -isystem: jaxlib's headers are not ours to warn about.
        ext.extra_compile_args = [*FLAGS, "-isystem", include]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - compiler missing, compile or link error
            self._skip(ext, str(e))

    def _skip(self, ext, why):
        print(f"WARNING: adamx: not building the native kernel {ext.name}: {why}\n"
              "WARNING: adamx works without it; adamx.apply(..., fused=True) raises and says "
              "why.", file=sys.stderr, flush=True)


setup(
    ext_modules=[
        Extension(
            "adamx._native._ext",
            sources=[f"{NATIVE}/module.cc", f"{NATIVE}/ffi.cc", f"{NATIVE}/kernel.cc"],
            depends=[f"{NATIVE}/abi.h", f"{NATIVE}/kernel.h", f"{NATIVE}/codes.h"],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
