"""The import rule, read from the source with :mod:`ast` (nothing is imported, so every backend's modules are
checked, not only those whose dependencies are installed here).

Arrows point one way: contract <- models <- export <- build <- cli; contract <- runtime; runtime <- serve.
No module of ``runtime/`` or ``contract`` imports ``export/``, ``models/`` or ``cli/``; no module of ``train/`` or
``bench/`` imports ``cli/``; no two packages import each other. What the restructuring of issue 21 has not yet
removed is listed in ``KNOWN``, and the test fails as soon as an entry is gone, so that the list only shrinks."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("onex_export", "train", "bench")
LOWER = ("onex_export.runtime", "onex_export.contract")
HIGHER = ("onex_export.export", "onex_export.models", "onex_export.cli")
CALLERS = ("train", "bench")

# (importer, imported package) pairs still to be removed: the torch reference backend of runtime/pipeline.py and
# the sampler's type import (issue 21, step 2: the torch backend moves to the checks).
KNOWN = {
    ("onex_export.runtime.pipeline", "onex_export.export"),
    ("onex_export.runtime.pipeline", "onex_export.models"),
    ("onex_export.runtime.sampler", "onex_export.models"),
}
# Package pairs that import each other today (issue 21, step 2).
KNOWN_CYCLES = {
    frozenset({"onex_export.export", "onex_export.runtime"}),
    frozenset({"onex_export.models", "onex_export.runtime"}),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The absolute names ``path`` imports (``from a import b`` yields ``a`` and ``a.b``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _package(name: str) -> str | None:
    """The package a module belongs to: ``onex_export.<room>`` for the package's rooms, else the top level."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    return ".".join(parts[:2]) if parts[0] == "onex_export" and len(parts) > 1 else parts[0]


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    found = set()
    for module, names in _graph().items():
        banned = HIGHER if any(_within(module, low) for low in LOWER) else \
            ("onex_export.cli",) if module.split(".")[0] in CALLERS else ()
        found |= {(module, high) for high in banned for name in names if _within(name, high)}
    assert found - KNOWN == set(), "new imports against the layering"
    assert KNOWN - found == set(), "these are fixed: remove them from KNOWN"


def test_no_two_packages_import_each_other():
    arrows = set()
    for module, names in _graph().items():
        if module == "onex_export":  # the package's facade re-exports the runtime lazily; every room runs it
            continue
        source = _package(module)
        arrows |= {(source, target) for target in map(_package, names) if target and target != source}
    cycles = {frozenset(pair) for pair in arrows if pair[::-1] in arrows}
    assert cycles - KNOWN_CYCLES == set(), "new import cycles between packages"
    assert KNOWN_CYCLES - cycles == set(), "these cycles are gone: remove them from KNOWN_CYCLES"
