"""The README stays a front page and the manuals stay a site: README.md's length, its quick-start commands, its links
and results tables; every page under docs/ in mkdocs.yml's nav, and every public name on the API reference page.
(CI builds the site itself with `mkdocs build --strict`, which checks the links between pages.)"""

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"

# CI (.ci/run) and the acceptance checks run these two lines as they are: change them there first.
QUICK_START_COMMANDS = (
    'pip install torch==2.13.0 && pip install -e ".[train]" && opd-fast train',
    'pip install torch==2.13.0 "triton==3.6.0" "numpy<2.3" && pip install -e ".[test]" && '
    'python -m pytest -m "not slow" -q -n auto --dist loadfile',
)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    following = text.find("\n## ", start + len(heading) + 2)
    return text[start : following if following != -1 else len(text)]


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _mkdocs_config() -> dict:
    # mkdocs.yml uses no !!python tags, so the safe loader reads it whole.
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def test_readme_fits_on_a_few_screens():
    lines = _readme().count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move the manuals' text to a page under docs/ and link it"


def test_readme_quick_start_commands_are_unchanged():
    quick_start = _section(_readme(), "## Quick start (fresh machine)")
    blocks = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert tuple(blocks) == QUICK_START_COMMANDS


def test_every_docs_page_is_in_the_nav():
    config = _mkdocs_config()
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    assert nav[0] == "index.md" and "design.md" in nav
    assert len(nav) == len(set(nav)), "a page is listed twice in mkdocs.yml's nav"
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, "mkdocs.yml's nav and the pages under docs/ differ"


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)\s]+)\)", _readme()):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        assert (REPO / path).exists(), f"README.md links to {target}, which does not exist"


def test_readme_results_tables_are_the_pages_tables():
    """The results tables in README.md are copies of the pages' (where their settings are written): no row differs."""
    pages = "\n".join(path.read_text(encoding="utf-8") for path in DOCS.rglob("*.md"))
    page_rows = {line.strip() for line in pages.splitlines() if line.strip().startswith("|")}
    results = _section(_readme(), "## Results")
    rows = [line for line in results.splitlines() if line.startswith("|")]
    assert len(rows) > 50, "README.md's results tables are gone"
    assert [row for row in rows if row not in page_rows] == []


def test_reference_page_documents_every_public_name():
    tree = ast.parse((REPO / "opd_fast" / "__init__.py").read_text(encoding="utf-8"))
    public = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: opd_fast\.(\w+)$", reference, flags=re.M))
    assert sorted(set(public) - {"__version__"} - documented) == []
