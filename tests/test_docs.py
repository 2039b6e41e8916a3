"""The front door stays small and its links stay alive.

README.md is at most 200 lines, names the two newcomer commands, and every relative link in it points to a file
that exists; mkdocs.yml's nav and docs/ list the same pages.  `make docs` (mkdocs build --strict, run in CI) checks
the links inside docs/; this test needs neither mkdocs nor the network.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

MAX_README_LINES = 200
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _without_code(text: str) -> str:
    """Markdown without fenced code blocks and inline code (links inside them are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _relative_links(text: str) -> list[str]:
    links = _LINK.findall(_without_code(text))
    return [link for link in links if not re.match(r"^(https?:|mailto:|#)", link)]


def _nav_pages(nav) -> list[str]:
    """Every page path in a mkdocs nav (nested sections included)."""
    pages: list[str] = []
    if isinstance(nav, str):
        pages.append(nav)
    elif isinstance(nav, list):
        for item in nav:
            pages.extend(_nav_pages(item))
    elif isinstance(nav, dict):
        for value in nav.values():
            pages.extend(_nav_pages(value))
    return pages


def _mkdocs_config() -> dict:
    return yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))


def test_readme_is_at_most_200_lines():
    n = len(_readme().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/ (limit {MAX_README_LINES})"


def test_readme_names_the_two_commands():
    text = _readme()
    assert "make demo" in text
    assert "make test" in text


def test_readme_relative_links_exist():
    links = _relative_links(_readme())
    assert links, "README.md should link to the docs pages"
    missing = []
    for link in links:
        path = link.split("#", 1)[0]
        if path and not (ROOT / path).exists():
            missing.append(link)
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.split("#", 1)[0]).resolve() for link in _relative_links(_readme())}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to: {unlinked}"


def test_mkdocs_nav_matches_docs_folder():
    config = _mkdocs_config()
    assert config.get("docs_dir", "docs") == "docs"
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is listed twice in the nav: {nav}"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav lists pages that do not exist: {missing}"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    unlisted = sorted(on_disk - set(nav))
    assert not unlisted, f"docs pages missing from the mkdocs.yml nav: {unlisted}"


def test_mkdocs_uses_material():
    config = _mkdocs_config()
    assert config["site_name"] == "edgeguard"
    assert config["theme"]["name"] == "material"
