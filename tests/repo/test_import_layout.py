"""The package's shape (issue 34): no import circle, the core never imports a product, integrations never import the
bundled trainer, no module over 500 lines, vocabulary sharding handled in one module. The graph comes from
scripts/layout_report.py, which prints the same facts for a review."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("layout_report", REPO_ROOT / "scripts" / "layout_report.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)

# The products built on the core, each in its own folder: none of the core's modules may import them.
PRODUCTS = ("opd_fast.bench", "opd_fast.cli", "opd_fast.diagnostics", "opd_fast.perf_model", "opd_fast.trainer")
MAX_LINES = 500


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return layout.import_graph()


def test_the_graph_sees_the_package(graph):
    # A guard for the checks below: they pass vacuously on an empty or misread graph.
    assert {"opd_fast", "opd_fast.functional", "opd_fast.kernels._common", "opd_fast.trainer.loop"} <= set(graph)
    assert "opd_fast.functional" in graph["opd_fast"]


def test_import_circles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert layout.import_circles(edges) == [["a", "b", "c"]]


def test_no_import_circle(graph):
    assert layout.import_circles(graph) == []


def test_the_core_never_imports_a_product(graph):
    wrong = {
        module: sorted(target for target in targets if _inside(target, PRODUCTS))
        for module, targets in graph.items()
        if not _inside(module, PRODUCTS)
    }
    assert not {module: targets for module, targets in wrong.items() if targets}


def test_integrations_never_import_the_bundled_trainer(graph):
    wrong = {
        module: sorted(target for target in targets if _inside(target, ("opd_fast.trainer", "opd_fast.bench")))
        for module, targets in graph.items()
        if _inside(module, ("opd_fast.integrations",))
    }
    assert not {module: targets for module, targets in wrong.items() if targets}


def test_no_module_over_500_lines():
    assert [(lines, path) for lines, path in layout.file_lengths() if lines > MAX_LINES] == []


def test_vocabulary_sharding_lives_in_one_module():
    # Sharded or not is decided once, in opd_fast/distributed.py; everything above sees the ops contract.
    pattern = re.compile(r"shard is (not )?None")
    found = [
        str(path.relative_to(REPO_ROOT))
        for path in layout.modules().values()
        if path.name != "distributed.py" and pattern.search(path.read_text())
    ]
    assert found == []
