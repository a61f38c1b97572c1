"""Which package may import which, read from the source (every import statement, at any depth):

* ``tunnel`` (what relay and node share) imports only the standard library;
* ``relay`` imports no torch, numpy or av, and nothing of the node;
* ``local_node`` imports nothing of the relay.

tests/test_packaging.py checks the relay's installed dependencies at run time; this catches an
import wherever it hides (a function body, a branch not taken in a test).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """{file: top-level names of the modules it imports}; relative imports resolve to ``package``."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def forbidden(package: str, allowed: set[str] | None = None, banned: set[str] = frozenset()) -> dict[str, set[str]]:
    """Files of ``package`` importing a banned module, or (with ``allowed``) anything outside it."""
    bad = {}
    for path, names in imported_modules(package).items():
        wrong = {n for n in names if n in banned or (allowed is not None and n not in allowed)}
        if wrong:
            bad[path] = wrong
    return bad


def test_the_tunnel_package_uses_only_the_standard_library():
    assert forbidden("tunnel", allowed={"tunnel", "__future__", *sys.stdlib_module_names}) == {}


def test_the_relay_imports_neither_torch_nor_the_node():
    assert forbidden("relay", banned={"torch", "numpy", "av", "transformers", "qwen_tts", "local_node"}) == {}


def test_the_node_imports_nothing_of_the_relay():
    assert forbidden("local_node", banned={"relay"}) == {}


@pytest.mark.parametrize("package, line, check", [
    ("tunnel", "import numpy", test_the_tunnel_package_uses_only_the_standard_library),
    ("relay", "from local_node import config", test_the_relay_imports_neither_torch_nor_the_node),
    ("local_node", "    from relay.errors import ApiError", test_the_node_imports_nothing_of_the_relay),
])
def test_a_forbidden_import_fails_the_check(tmp_path, monkeypatch, package, line, check):
    """Each rule above fails when such an import is added (in a function body, for the node)."""
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(ROOT / package, copy / package)
    target = copy / package / "__init__.py"
    body = line if not line.startswith(" ") else f"def later():\n{line}\n"
    target.write_text(target.read_text() + "\n" + body + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", copy)
    with pytest.raises(AssertionError):
        check()
