"""Builds the compiled hot path (``ppipe_trt._native``); everything else is in pyproject.toml.

The extension is optional: without a C compiler (or Cython) the install still succeeds and
ppipe-trt runs the pure-Python reference of the same code (``ppipe_trt.scheduler.native``
says which one runs, and why).  The SHA-256 of each ``.pyx`` is compiled in, so an edited
source whose build is stale is never used (rebuild: ``pip install -e .``).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


HERE = Path(__file__).resolve().parent
SOURCES = {"ppipe_trt._native.reservation": "ppipe_trt/_native/reservation.pyx",
           "ppipe_trt._native.timed": "ppipe_trt/_native/timed.pyx"}


class OptionalBuildExt(build_ext):
    """Builds each compiled module where a C compiler works; where it does not, says so and
    goes on (the install succeeds; the pure-Python references run).  ``Extension(optional=
    True)`` alone does not cover editable installs."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler or linker failure
            print(f"ppipe-trt: {ext.name} not compiled ({exc}); its pure-Python reference "
                  "runs instead")

    def _built(self, ext) -> bool:
        name = self.get_ext_filename(self.get_ext_fullname(ext.name))
        return Path(self.build_lib, name).exists() or Path(name).exists()

    def copy_extensions_to_source(self):
        # an editable install copies what was built into the tree: only that
        every, self.extensions = self.extensions, [e for e in self.extensions if self._built(e)]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every

    def get_outputs(self):
        return [out for out in super().get_outputs() if Path(out).exists()]


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:  # no Cython: the pure-Python reference runs
        print("ppipe-trt: Cython not found; the compiled scheduler is not built")
        return []
    out = []
    for name, src in SOURCES.items():
        sha = hashlib.sha256((HERE / src).read_bytes()).hexdigest()
        ext = Extension(name, [src], optional=True,
                        # no fused multiply-adds: the compiled scheduler must compute every
                        # time exactly as the Python reference does
                        extra_compile_args=["-O2", "-ffp-contract=off"])
        out += cythonize([ext], compile_time_env={"PPIPE_SOURCE_SHA256": sha},
                         language_level=3, quiet=True)
    return out


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
