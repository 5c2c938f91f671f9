"""Build of polycos' optional native CPU kernel; the metadata lives in pyproject.toml.

``polycos/_kernels/cpu.cpp`` is compiled into a plain shared library,
``polycos/_kernels/_polycos_cpu.so``, loaded with ctypes (no Python C API, so
one build serves every Python version). The extension is optional: without a
working C++17 compiler the build prints a warning, polycos installs anyway and
runs on its array-API core (``polycos._kernels.unavailable_reason()`` says why).

Portable by construction: no ``-march``; the hot loops are compiled a second
time for AVX2+FMA inside the source (``#pragma GCC target``) and chosen at run
time, so one wheel runs on any x86-64 CPU. No ``-ffast-math`` and no FMA
contraction: the kernel must round exactly like ``polycos._core``.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = os.path.join("polycos", "_kernels")

COMPILE_ARGS = [
    "-std=c++17",
    "-O3",
    "-g0",  # Python's CFLAGS carry -g: debug info triples this template-heavy build's time
    "-ffp-contract=off",  # no a*b+c -> fma: the sequences must round as in NumPy
    "-fno-math-errno",  # sqrt is an instruction (errno is never read)
    "-fvisibility=hidden",  # export only the C ABI and the XLA FFI handlers
    "-fPIC",
    "-pthread",
    "-Wno-psabi",
    "-isystem",
    os.path.join(KERNELS, "third_party"),  # the vendored XLA FFI headers (Apache-2.0)
]
LINK_ARGS = ["-pthread"]


class BuildKernel(build_ext):
    """Builds the kernel as a ctypes library: no ``PyInit_`` export, no ABI tag in its name."""

    def get_ext_filename(self, fullname: str) -> str:
        suffix = ".dll" if sys.platform == "win32" else ".so"
        return os.path.join(*fullname.split(".")) + suffix

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = COMPILE_ARGS
                ext.extra_link_args = LINK_ARGS
        # Other compilers (MSVC) lack GCC vector extensions: the optional build
        # fails with a warning and polycos uses its array-API core.
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "polycos._kernels._polycos_cpu",
            sources=[os.path.join(KERNELS, "cpu.cpp")],
            depends=[os.path.join(KERNELS, "rows.h")],
            include_dirs=[KERNELS],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildKernel},
)
