"""Shared fixtures and helpers: realistic random inputs and relative-error comparisons."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch must be set before any
# kernel module is imported (triton.jit reads it at decoration time), hence here, at collection start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_fidelity import match_compiled_nan_semantics

    match_compiled_nan_semantics()  # NaN in tl.maximum/tl.minimum as on the GPU

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Under pytest-xdist (README's test command runs `-n auto`) each worker, and every process its tests start, gets its
# share of the cores: torch's default, one thread per core in every process, would put several threads on each
# core, and every small op would then wait at an OpenMP barrier for a time slice.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# The longest files, started first: `--dist loadfile` hands files to the workers in collection order, so these then
# overlap the many short ones instead of running alone at the end (seconds on this project's 2-core CPU, serially).
LONGEST_FILES = (
    "test_gpu_verify.py",  # the GPU script's rehearsal, ~80
    "test_triton_aot.py",  # every Triton kernel compiled for sm_90a and sm_80, ~95
    "test_backend_contract.py",  # every backend and plan against the float64 reference, ~150
    "test_fuzz.py",
)


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keeps its order


# The third-party modules the tests import (each test skips where its module is not installed). One that is
# installed but no longer imports, a dependency's new release breaking it, stops the run with one line.
IMPORTED_DEPENDENCIES = (
    "transformers.modeling_utils",
    "peft",
    "trl",
    "liger_kernel.transformers",
    "triton",
    "matplotlib.pyplot",
    "hypothesis",
    "safetensors.torch",
)


def pytest_sessionstart(session):
    for name in IMPORTED_DEPENDENCIES:
        reason = broken_dependency(name)
        if reason:
            pytest.exit(reason, returncode=pytest.ExitCode.USAGE_ERROR)


def broken_dependency(name: str) -> str | None:
    """Why ``import name`` fails although its distribution is installed (None: it imports, or is not installed)."""
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return None
    try:
        importlib.import_module(name)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return (
            f"dependency check: `import {name}` fails with {_installed_version(top)}: "
            f"{type(exc).__name__}: {first_line}"
        )
    return None


def _installed_version(module: str) -> str:
    for distribution in importlib.metadata.packages_distributions().get(module, [module]):
        try:
            return f"{distribution} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{module} (version unknown)"


CSRC = Path(__file__).resolve().parents[1] / "csrc"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when the expected norm is 0)."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


def make_pair(
    lead=(7,),
    hs_dim=16,
    ht_dim=24,
    vocab=101,
    dtype=torch.float64,
    logit_scale=4.0,
    requires_grad=True,
):
    """Student/teacher hidden states ``lead + [H]`` and weights ``[V, H]`` with logits of std ≈ logit_scale."""
    hs = torch.randn(*lead, hs_dim, dtype=torch.float64)
    ws = torch.randn(vocab, hs_dim, dtype=torch.float64) * (logit_scale / hs_dim**0.5)
    ht = torch.randn(*lead, ht_dim, dtype=torch.float64)
    wt = torch.randn(vocab, ht_dim, dtype=torch.float64) * (logit_scale / ht_dim**0.5)
    hs, ws, ht, wt = (t.to(dtype) for t in (hs, ws, ht, wt))
    if requires_grad:
        hs.requires_grad_()
        ws.requires_grad_()
    return hs, ws, ht, wt


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor | None = None):
    """Gradients of Σ grad_output · output w.r.t. ``inputs`` (grad_output defaults to ones)."""
    if grad_output is None:
        grad_output = torch.ones_like(output)
    return torch.autograd.grad(output, inputs, grad_output)


# ---- the CUDA backend's host build (tests/backends/test_cuda_backend.py, test_backend_contract.py,
# api/test_numerics.py) ----


@pytest.fixture(scope="session")
def host_kernels():
    """csrc/bindings.cpp + csrc/host/launchers_host.cpp built for CPU tensors (~25 s once, then cached)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build the host kernels")
    from torch.utils.cpp_extension import load

    return load(
        name="opd_fast_host_kernels",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "host" / "launchers_host.cpp")],
        extra_cflags=["-O2", "-std=c++20", "-pthread", "-DOPD_FAST_HOST_BUILD"],  # C++20: std::barrier
        extra_ldflags=["-pthread"],
    )


@pytest.fixture
def cuda_on_cpu(monkeypatch, host_kernels):
    """backend="cuda" runs on CPU tensors, with the host build in place of opd_fast._C."""
    from opd_fast import backends
    from opd_fast.backends import cuda_backend

    monkeypatch.setattr(cuda_backend, "_ops_module", lambda: host_kernels)
    monkeypatch.setitem(backends._TABLE, "cuda", ("opd_fast.backends.cuda_backend:CudaOps", lambda device: None))
    return host_kernels


def use_cuda_backend(request) -> None:
    """Make backend="cuda" run in a test: the built extension on a GPU (the test is skipped when it is not
    built), else the host build (the ``cuda_on_cpu`` fixture)."""
    from opd_fast.backends import cuda_backend

    if DEVICE.type != "cuda":
        request.getfixturevalue("cuda_on_cpu")
    elif cuda_backend.extension_error() is not None:
        pytest.skip(f"the CUDA extension is not built: {cuda_backend.extension_error()}")


# ---- the trainer's tiny models (tests/trainer/test_trainer.py, tests/trainer/test_recipes.py) -------------------
from opd_fast.trainer import load_config  # noqa: E402
from opd_fast.trainer.demo import ModelSpec, build_tokenizer, create_model  # noqa: E402
from opd_fast.trainer.tasks import ReverseTask  # noqa: E402

TASK = ReverseTask()  # the default data.task
TINY_RUN = [
    "rollout.batch_size=6",
    "rollout.max_new_tokens=10",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.overlap_k=3",
    "data.eval_size=8",
    "optim.lr=0.01",
    "device=cpu",
]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A student and a wider teacher with a padded lm_head (20 rows for a 15-token tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer(TASK.characters)
    student = create_model(ModelSpec(hidden=16, layers=1, heads=2, vocab_rows=0), tokenizer, root / "student", seed=1)
    teacher = create_model(ModelSpec(hidden=24, layers=1, heads=2, vocab_rows=20), tokenizer, root / "teacher", seed=2)
    return student, teacher


def tiny_config(models, out_dir, *overrides):
    """A validated TrainConfig for the tiny models: TINY_RUN plus ``overrides``, writing to ``out_dir``."""
    student, teacher = models
    return load_config(
        None, [*TINY_RUN, f"student.path={student}", f"teacher.path={teacher}", *overrides], out_dir=str(out_dir)
    )
