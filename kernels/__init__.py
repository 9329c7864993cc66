"""Triton kernels of opd_fast, installed as ``opd_fast.kernels`` (never as a top-level ``kernels``).

Each op gets a module here holding its ``@triton.jit`` kernels and a thin launcher whose argument order
matches the CUDA binding in ``csrc/``; ``opd_fast.backends`` dispatches to them. Nothing in this package
queries the GPU at import time.

The folder sits at the repository root (setup.py maps it onto ``opd_fast.kernels``), and a Python started there
(``python -m pytest``, ``python -c``, a notebook) has the root first on ``sys.path``, where this folder would
shadow Hugging Face's ``kernels`` distribution, which transformers imports. Imported under the top-level name,
this file therefore hands the import over to the installed distribution (docs/design.md §6 says why this and not
a namespace folder). Without one, the module stays an empty stand-in that looks like what transformers < 5.20
takes for a stray namespace folder (no ``__file__``, no ``__version__``: "not a real install"), and any name taken
from it raises ModuleNotFoundError.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_to_the_installed_distribution() -> None:
    """Replace this module in ``sys.modules["kernels"]`` by the ``kernels`` found on ``sys.path`` past this root.

    ``import kernels`` returns whatever ``sys.modules["kernels"]`` holds once this file has run, so the caller gets
    the distribution's module. Without one this module stays, emptied to a stand-in: transformers < 5.20 finds the
    folder with ``find_spec("kernels")``, finds no metadata and imports it to read a version; raising here would end
    ``import transformers.modeling_utils`` with it, while a module with neither ``__file__`` nor ``__version__`` is
    what it treats as a namespace folder shadowing nothing (``_is_package_available``), i.e. no ``kernels``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    search_path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search_path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)
        return
    globals()["__file__"] = None
    absent = (
        f"No module named 'kernels': {root}/kernels is opd_fast's Triton kernels, importable only as "
        f"opd_fast.kernels, and no `kernels` distribution is installed"
    )

    def __getattr__(name: str):
        if name.startswith("__"):  # getattr(module, "__version__", default) and friends: absent, as on any module
            raise AttributeError(name)
        raise ModuleNotFoundError(absent, name="kernels")

    globals()["__getattr__"] = __getattr__


if __name__ == "kernels":
    _hand_over_to_the_installed_distribution()
