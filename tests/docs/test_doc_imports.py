"""Every import path the docs give exists: each ``from fedfleet... import ...`` of a code block, and each
```fedfleet.a.b``` the prose names (a module, or a name inside one). A newcomer copying an import from the docs
never meets an ImportError because a module moved."""

import importlib
import re

import pytest

from tests.paths import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FROM_IMPORT = re.compile(r"^\s*from (fedfleet[\w.]*) import (\([^)]*\)|[^\n#]+)", re.M)
DOTTED = re.compile(r"`(fedfleet(?:\.\w+)+)`")


def resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def imported_names(page) -> list[str]:
    text = page.read_text(encoding="utf-8")
    names = []
    for module, imported in FROM_IMPORT.findall(text):
        for name in re.sub(r"[()\s]", " ", imported).replace(",", " ").split():
            if name != "as" and not names_alias(imported, name):
                names.append(f"{module}.{name}")
    return names + DOTTED.findall(text)


def names_alias(imported: str, name: str) -> bool:
    """True for the alias of ``X as alias`` (it is not a name of the module)."""
    return re.search(rf"\bas\s+{re.escape(name)}\b", imported) is not None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_import_paths_in_the_docs_exist(page):
    missing = sorted({name for name in imported_names(page) if not resolves(name)})
    assert not missing, f"{page.name} names import paths that do not exist: {missing}"
