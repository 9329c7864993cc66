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
