"""The layers of ``server`` and ``backends`` import only downward, so a request's path stays readable in folders.

Each module belongs to the layer of the longest prefix in ``LAYERS``; a module may import its own layer and any
layer listed before it. A new module under an existing package inherits its layer; a new top-level package must
be placed here, or this test fails for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top.
LAYERS: list[tuple[str, ...]] = [
    ("server", "server.errors", "server.devices", "server.worker_processes", "server.allocator"),
    ("server.protocol",),
    ("server.config",),
    ("server.extensions",),
    ("server.structured_output",),
    ("backends",),
    ("server.scheduling",),
    ("server.repository",),
    ("server.core", "server.admission"),
    ("server.frontends",),
    ("server.runtime", "server.shutdown", "server.cli", "server.perf", "server.__main__"),
]
# ``server`` alone is the package's ``__init__`` (the version); every other ``server.*`` module must be listed.
_EXACT_ONLY = {"server"}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            exact = module == prefix
            nested = module.startswith(prefix + ".") and prefix not in _EXACT_ONLY
            if (exact or nested) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """Every project module ``path`` imports, at any depth (function-level imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from server import errors`` imports the module ``server.errors``.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate) else base))
    return [(line, name) for line, name in found if name.split(".")[0] in ("server", "backends")]


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


SOURCES = sorted(
    path
    for package in ("server", "backends")
    for path in (ROOT / package).rglob("*.py")
    if "generated" not in path.parts
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_its_own_layer_or_below(path: Path) -> None:
    module = module_name(path)
    own = layer_of(module)
    upward = [
        f"line {line}: {name} ({' / '.join(LAYERS[layer_of(name)])}) is above {module}"
        for line, name in imported_modules(path, module)
        if layer_of(name) > own
    ]
    assert not upward, "\n".join(upward)


def test_every_package_says_what_it_holds_and_may_import() -> None:
    for init in sorted((ROOT / "server").rglob("__init__.py")) + sorted((ROOT / "backends").glob("__init__.py")):
        if "generated" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 20, f"{init.relative_to(ROOT)} needs a paragraph on what it holds"


def test_a_module_reaching_up_is_caught() -> None:
    assert layer_of("server.frontends.http_server") > layer_of("server.scheduling.dynamic_batcher")
    assert layer_of("server.scheduling.instances") > layer_of("backends.base")
    with pytest.raises(LookupError):
        layer_of("server.somewhere_new")
