"""The installed layout: opd_fast.kernels comes from kernels/, and no top-level `kernels` is installed."""

import ast
import json
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_installed_as_opd_fast_kernels(tmp_path):
    # Run from an unrelated directory so the repository root is not on sys.path.
    code = (
        "import importlib.util, json, opd_fast.kernels; "
        "print(json.dumps([opd_fast.kernels.__file__, importlib.util.find_spec('kernels') is None]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, no_top_level = json.loads(out.stdout)
    assert Path(kernels_file).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert no_top_level, "a top-level `kernels` module is importable; it must only exist as opd_fast.kernels"


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


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("opd-fast") == "opd_fast.cli:main"


def test_layout_directories_exist():
    for name in ("kernels", "csrc", "opd_fast", "benchmarks", "tests", "setup.py", "CMakeLists.txt", "pyproject.toml"):
        assert (REPO / name).exists(), name


def test_trainer_does_not_load_the_benchmark():
    # Training (and plotting its curves) needs neither the benchmark nor the peer baselines it times.
    code = (
        "import json, sys, opd_fast.trainer, opd_fast.trainer.plots; "
        "print(json.dumps([m for m in ('opd_fast.bench', 'opd_fast.baselines') if m in sys.modules]))"
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
