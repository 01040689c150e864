"""Builds specdec's CPU kernels (`specdec._cpu_kernels`, C++ XLA FFI custom calls) at install time.

Everything else is in pyproject.toml. The kernels are optional: without a C++ compiler (or on a
non-x86 machine) the build prints a warning and specdec falls back to XLA's own ops, saying so
once in the log when it first runs on CPU.
"""

import importlib.util
import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include() -> str:
    # jaxlib ships the XLA FFI headers; read them without importing jax (build requirement: jaxlib).
    spec = importlib.util.find_spec("jaxlib")
    return os.path.join(spec.submodule_search_locations[0], "include") if spec else ""


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing, and then installs no kernel module."""

    def run(self):
        try:
            for ext in self.extensions:
                ext.include_dirs.append(_ffi_include())
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure leaves the XLA fallback
            print(f"WARNING: specdec's CPU kernels were not built ({e}); specdec will use XLA's ops on CPU")
            self.extensions = []

    def get_outputs(self):
        return super().get_outputs() if self.extensions else []

    def get_output_mapping(self):
        return super().get_output_mapping() if self.extensions else {}


kernels = "specdec/kernels/"
ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules.append(
        Extension(
            "specdec._cpu_kernels",
            sources=[kernels + f for f in ("module.cc", "packed_matmul.cc", "cache_attention.cc")],
            depends=[kernels + "parallel.h"],
            extra_compile_args=[
                "-O3",
                "-std=c++17",
                "-fvisibility=hidden",
                "-Wno-attributes",
                "-Wno-return-type",
                "-Wno-psabi",
            ],  # fmt: skip
            language="c++",
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
