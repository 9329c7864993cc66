"""Build script for opd_fast.

Project metadata lives in pyproject.toml; this file only maps the source folders onto the package:

* ``opd_fast/``  -> ``opd_fast``              (public API, backends, CLI)
* ``kernels/``   -> ``opd_fast.kernels``      (Triton kernels). Never a top-level ``kernels``: that import
                                              name belongs to another PyPI project.
* ``csrc/``      -> ``opd_fast._C``           (CUDA C++). Not built by this version: the install is pure
                                              Python and says so.

Nothing here imports torch, so ``pip install -e .`` works with build isolation on any machine.
"""

import sys

from setuptools import setup

PACKAGES = ["opd_fast", "opd_fast.backends", "opd_fast.kernels"]

print(
    "opd_fast: installing the pure-Python package (torch and Triton backends); "
    "the CUDA extension opd_fast._C is not built by this version.",
    file=sys.stderr,
)

setup(
    packages=PACKAGES,
    package_dir={"opd_fast": "opd_fast", "opd_fast.kernels": "kernels"},
)
