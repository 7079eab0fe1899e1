"""Builds the wheel: setuptools-rust compiles the C library (the crate ``edgetune-capi`` in
``../c``) with cargo and puts it inside the package, where ``edgetune/_native.py`` finds it.

setuptools-rust rather than maturin: the package is plain Python over ctypes and the library a
plain ``cdylib`` with a C ABI, which setuptools-rust builds as it is (``Binding.NoBinding``);
maturin's library modes expect pyo3, cffi or uniffi bindings. The library uses no Python C API,
so the wheel is tagged ``py3-none-<platform>``: any Python 3, this platform.
"""

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools_rust import Binding, RustExtension


class PlatformWheel(bdist_wheel):
    """A wheel for this platform that any Python 3 can install (no Python ABI inside)."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    rust_extensions=[
        RustExtension(
            "edgetune.libedgetune",
            path="../c/Cargo.toml",
            binding=Binding.NoBinding,
            args=["--locked"],
        )
    ],
    cmdclass={"bdist_wheel": PlatformWheel},
    zip_safe=False,
)
