"""Builds the native CPU kernels when pip installs the package, so that a first start compiles nothing.

Everything else is in pyproject.toml. The library is named by the key of what it was built from (source, compiler,
jaxlib, CPU, NOVALLM_KERNEL_FLAGS); at run time `novallm_jax.kernels.native` loads it when its key matches and
otherwise compiles into a cache as before. No compiler, or a failed build, installs the package without it.
"""

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location("_novallm_build", Path(__file__).parent / "novallm_jax/kernels/build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def _jaxlib() -> tuple[str, str] | None:
    """(version, FFI include directory) of the jaxlib in this build environment (pyproject's build requires)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return importlib.metadata.version("jaxlib"), os.path.join(spec.submodule_search_locations[0], "include")


class BuildKernels(build_ext):
    def build_extension(self, ext):
        compiler, jaxlib = build.compiler(), _jaxlib()
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            if compiler is None or jaxlib is None:
                raise RuntimeError("no C++ compiler" if compiler is None else "no jaxlib in the build environment")
            print(f"novallm-jax: compiling the native CPU kernels with {compiler}", file=sys.stderr)
            build.compile_library(compiler, jaxlib[1], out)
        except RuntimeError as e:
            # The package works without it: the kernels are built at first use, or XLA's ops run instead.
            print(f"novallm-jax: native CPU kernels not built at install: {e}", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e is not ext]

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        # An editable install leaves the library in the source tree: drop those of earlier installs.
        here = Path(__file__).parent / "novallm_jax" / "kernels"
        keep = {Path(self.get_ext_fullpath(e.name)).name for e in self.extensions}
        for old in here.glob(f"{build.INSTALLED_PREFIX}*"):
            if old.name not in keep:
                old.unlink()


def _extensions() -> list:
    compiler, jaxlib = build.compiler(), _jaxlib()
    if compiler is None or jaxlib is None:
        return []
    return [Extension(f"novallm_jax.kernels.{build.INSTALLED_PREFIX}{build.key(compiler, jaxlib[0])}", sources=[])]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels})
