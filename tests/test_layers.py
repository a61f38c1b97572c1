"""Which package may import which, read from the source (every import statement, at any depth):

* ``tunnel`` (what relay and node share) imports only the standard library;
* ``relay`` imports no torch, numpy or av, and nothing of the node;
* ``local_node`` imports nothing of the relay;
* inside the node, a layer imports only the layers below it (``NODE_LAYERS``).

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


# The node's layers, each with those it may use. ``testing`` (random checkpoints) sits beside the
# model runner; only the command line, which composes everything, may import it.
NODE_LAYERS = {
    "config": set(),
    "kernels": set(),
    "model": {"kernels"},
    "engine": {"config", "kernels", "model"},
    "serving": {"config", "engine"},
    "testing": {"model"},
    "__main__": {"config", "kernels", "model", "engine", "serving", "testing"},
    "__init__": set(),
}


def node_layer(module: str) -> str:
    """``local_node.engine.qwen`` -> ``engine``; ``local_node.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__main__"


def node_imports() -> dict[str, set[str]]:
    """{file of the node: the node's modules it imports, as dotted names}."""
    found = {}
    for path in sorted((ROOT / "local_node").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = module.split(".")[:-1]  # also right for an __init__.py, whose module ends in __init__
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                names |= {f"{stem}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("local_node.")}
    return found


def test_each_node_layer_uses_only_the_layers_below_it():
    bad = {}
    for path, names in node_imports().items():
        layer = node_layer(".".join(Path(path).with_suffix("").parts))
        assert layer in NODE_LAYERS, f"{path}: a node layer the rule does not know: {layer}"
        wrong = {n for n in names if node_layer(n) not in NODE_LAYERS[layer] | {layer}}
        if wrong:
            bad[path] = wrong
    assert bad == {}


@pytest.mark.parametrize(
    "package, line, check",
    [
        ("tunnel", "import numpy", test_the_tunnel_package_uses_only_the_standard_library),
        ("relay", "from local_node import config", test_the_relay_imports_neither_torch_nor_the_node),
        ("local_node", "    from relay.errors import ApiError", test_the_node_imports_nothing_of_the_relay),
        ("local_node/model", "from local_node.engine.base import Job", test_each_node_layer_uses_only_the_layers_below_it),
        ("local_node/kernels", "    from ..model import packing", test_each_node_layer_uses_only_the_layers_below_it),
        ("local_node/serving", "from local_node.testing import tiny_model", test_each_node_layer_uses_only_the_layers_below_it),
    ],
)
def test_a_forbidden_import_fails_the_check(tmp_path, monkeypatch, package, line, check):
    """Each rule above fails when such an import is added (in a function body, for the node)."""
    import shutil

    copy = tmp_path / "root"
    top = package.split("/")[0]
    shutil.copytree(ROOT / top, copy / top)
    target = copy / package / "__init__.py"
    body = line if not line.startswith(" ") else f"def later():\n{line}\n"
    target.write_text(target.read_text() + "\n" + body + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", copy)
    with pytest.raises(AssertionError):
        check()
