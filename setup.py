"""Build script for opd_fast.

Project metadata lives in pyproject.toml; this file maps the source folders onto the package:

* ``opd_fast/``  -> ``opd_fast``              (public API, backends, CLI)
* ``kernels/``   -> ``opd_fast.kernels``      (Triton kernels). Never a top-level ``kernels``: that import
                                              name belongs to another PyPI project.
* ``csrc/``      -> ``opd_fast._C``           (CUDA C++), built only when torch is a CUDA build and nvcc
                                              is found; otherwise the install is pure Python and says why.

torch is imported lazily, inside a try: under build isolation (a plain ``pip install -e .``) the build
environment has no torch, so the install is pure Python and never pulls a multi-GB torch into it. The
CUDA build uses the torch already installed, like flash-attention:

    pip install -e . --no-build-isolation

Environment: ``OPD_FAST_CUDA_ARCHS`` (default "80;90a") lists the GPU architectures to compile for;
``OPD_FAST_SKIP_CUDA_BUILD=1`` skips the extension.
"""

import importlib
import os
import shutil
import sys
from pathlib import Path

import setuptools
from setuptools import setup

# The license as a PEP 639 expression where setuptools knows it (>= 77), else the older free-text field: a static
# `license = "Apache-2.0"` in pyproject.toml fails `pip install --no-build-isolation -e .` under setuptools 68.
LICENSE = (
    {"license_expression": "Apache-2.0"}
    if int(setuptools.__version__.split(".")[0]) >= 77
    else {"license": "Apache-2.0"}
)
PACKAGES = [
    "opd_fast",
    "opd_fast.backends",
    "opd_fast.bench",
    "opd_fast.cli",
    "opd_fast.diagnostics",
    "opd_fast.integrations",
    "opd_fast.kernels",
    "opd_fast.library",
    "opd_fast.perf_model",
    "opd_fast.trainer",
]
ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def _say(message: str) -> None:
    print(f"opd_fast: {message}", file=sys.stderr)


def _pure_python(reason: str) -> dict:
    _say(
        f"installing the pure-Python package (torch and Triton backends); the CUDA extension opd_fast._C is "
        f"not built: {reason}"
    )
    return {}


def _gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for "80;90a"-style lists (real code per architecture, no PTX)."""
    flags = []
    for arch in (a.strip() for a in archs.replace(",", ";").split(";")):
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise SystemExit(f"OPD_FAST_CUDA_ARCHS={archs!r} lists no architecture; use e.g. '80;90a'")
    return flags


def _set_cuda_home() -> None:
    """Unless CUDA_HOME or CUDA_PATH is set, point CUDA_HOME at the toolkit that holds libcudart.so.

    torch.utils.cpp_extension takes the folder above nvcc's folder, which is wrong when nvcc on PATH is a wrapper
    script or a link outside the toolkit (/usr/local/bin/nvcc gives /usr/local): every object compiles and the
    link step then fails on -lcudart. Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME
    once, at import.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    for home in [*candidates, Path("/usr/local/cuda")]:
        if any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
            os.environ["CUDA_HOME"] = str(home)
            return


def cuda_extension() -> dict:
    """setup() keywords that build opd_fast._C, or {} (pure Python) with the reason printed."""
    if os.environ.get("OPD_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return _pure_python("OPD_FAST_SKIP_CUDA_BUILD=1")
    _set_cuda_home()
    try:
        torch = importlib.import_module("torch")
        cpp_extension = importlib.import_module("torch.utils.cpp_extension")
    except ImportError as exc:
        return _pure_python(
            f"torch is not importable in this build environment ({exc}); for the CUDA build install torch "
            f"first and run `pip install -e . --no-build-isolation`"
        )
    if torch.version.cuda is None:
        return _pure_python(f"torch {torch.__version__} is a CPU build")
    nvcc = shutil.which("nvcc")
    if nvcc is None and cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    if nvcc is None:
        return _pure_python("nvcc was not found (put the CUDA toolkit's bin/ on PATH or set CUDA_HOME)")
    archs = os.environ.get("OPD_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
    _say(f"building the CUDA extension opd_fast._C with {nvcc} for architectures {archs}")
    # Relative paths: setuptools refuses absolute source paths.
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))] + ["csrc/bindings.cpp"]
    extension = cpp_extension.CUDAExtension(
        name="opd_fast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", *_gencode_flags(archs)]},
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(
    packages=PACKAGES,
    package_dir={"opd_fast": "opd_fast", "opd_fast.kernels": "kernels"},
    **LICENSE,
    **cuda_extension(),
)
