"""The documentation site holds together: nav, pages, links, snippets, the API directives and the CI commands.

These checks read the files only (no MkDocs needed), so they run in the default suite; the full
`mkdocs build --strict` runs in CI (`make docs`) and here as a slow test when the docs extra is installed.
"""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links inside code are code, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = _nav_pages(_config()["nav"])
    assert sorted(set(nav)) == PAGES, "docs/*.md and the nav of mkdocs.yml differ"
    assert len(nav) == len(set(nav)), "a page is twice in the nav"
    assert _config()["strict"] is True


@pytest.mark.parametrize("page", ["README.md", *[f"docs/{p}" for p in PAGES]])
def test_relative_links_and_images_resolve(page):
    path = ROOT / page
    missing = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_snippets_included_by_the_configuration_reference_exist():
    text = (DOCS / "configuration.md").read_text()
    paths = re.findall(r'--8<-- "([^"]+)"', text)
    assert "conf/train.yaml" in paths and any(p.startswith("recipes/") for p in paths)
    assert [p for p in paths if not (ROOT / p).is_file()] == []


API_MODULES = ["bpkit.alert", "bpkit.errors", "bpkit.callbacks", "bpkit.stats", "bpkit.detect", "bpkit.clip",
               "bpkit.gradcheck", "bpkit.schedules", "bpkit.tbptt", "bpkit.models", "bpkit.task", "bpkit.data",
               "bpkit.lr_find", "bpkit.sweep"]


def _directives() -> list[str]:
    return [m for p in (DOCS / "api").glob("*.md") for m in re.findall(r"^::: (\S+)", p.read_text(), flags=re.M)]


def test_the_api_reference_covers_the_public_modules():
    directives = _directives()
    for module in API_MODULES:
        assert any(d == module or d.startswith(module + ".") for d in directives), f"no API page documents {module}"
    for name in ["GradientMonitor", "ActivationMonitor", "GradientClipping", "GradientCheck", "RunRecord"]:
        assert any(d.endswith("." + name) for d in directives), name


def test_every_api_directive_names_an_importable_object():
    for ident in _directives():
        parts = ident.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"{ident}: {attr} not found"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{ident} cannot be imported")


def test_the_readme_keeps_the_test_command_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, flags=re.M), "the README's test command is `make test`"
    makefile = (ROOT / "Makefile").read_text()
    assert '\t$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)' in makefile.split("\ntest:", 1)[1].split("\n\n")[0]
    ci = [line.split("#", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci and "make docs" in ci
    assert ci.index("make test") < ci.index("make docs")
    assert "mkdocs build --strict" in makefile.split("\ndocs:", 1)[1].split("\n\n")[0]


def test_the_readme_is_an_entry_point_not_the_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for heading in ["## Install", "## Two commands", "## Add bpkit to your Lightning project",
                    "## Without the Trainer: a plain PyTorch loop or Lightning Fabric", "## Documentation"]:
        assert heading in readme
    linked = {t.split("#", 1)[0] for t in LINK.findall(readme) if t.startswith("docs/")}
    assert {"docs/getting-started.md", "docs/api/index.md", "docs/plain-pytorch.md"} <= linked


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)], cwd=ROOT,
                            capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (site / "api" / "callbacks" / "index.html").is_file()
    assert "GradientMonitor" in (site / "api" / "callbacks" / "index.html").read_text()
    shutil.rmtree(site)
