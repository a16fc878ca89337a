"""Rules of the repository's layout that no other test would notice breaking."""

import ast
import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

from crobim_u.training.model_card import DEFAULT_TEMPLATE

TESTS = Path(__file__).resolve().parent
REPOSITORY = TESTS.parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules a file imports (absolute imports anywhere in it, not inside strings)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_test_modules_share_code_only_through_helpers():
    # A helper two test modules need lives in helpers.py (or, as a fixture, in conftest.py, which pytest loads itself):
    # then each test module reads on its own, and running one file never runs another's module-level code.
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {
        path.name: sorted(imported_modules(path) & (test_modules | {"conftest"}))
        for path in sorted(TESTS.glob("*.py"))
    }
    assert {name: modules for name, modules in offenders.items() if modules} == {}


def test_the_packaged_model_card_template_is_the_root_model_card():
    # The package reads its own copy (so an installed wheel has it); the root one is edited and shown on the Hub.
    packaged = resources.files("crobim_u") / "templates" / "model_card.md"
    assert DEFAULT_TEMPLATE == packaged
    assert packaged.read_bytes() == (REPOSITORY / "model_card.md").read_bytes(), (
        "crobim_u/templates/model_card.md differs from model_card.md (the copy to edit): "
        "cp model_card.md crobim_u/templates/model_card.md"
    )
    # ... and the wheel carries it: setuptools' package data of `crobim_u` matches the template's path.
    package_data = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch("templates/model_card.md", pattern) for pattern in package_data["crobim_u"])
