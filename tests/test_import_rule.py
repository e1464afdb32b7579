"""The import rule, read from the source with :mod:`ast` (nothing is imported, so every backend's modules are
checked, not only those whose dependencies are installed here).

Arrows point one way: contract <- models <- export <- check <- build <- cli; contract <- runtime <- check;
runtime <- serving. ``FORBIDDEN`` lists, per room, the rooms above it; ``train`` and ``bench`` use the library, not
the CLI. No two packages import each other."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("onex_export", "train", "bench")
CONTRACT, MODELS, RUNTIME, EXPORT, CHECK, BUILD, CLI, SERVING = (
    f"onex_export.{room}" for room in ("contract", "models", "runtime", "export", "check", "build", "cli", "serving"))
FORBIDDEN = {
    CONTRACT: (MODELS, RUNTIME, EXPORT, CHECK, BUILD, CLI, SERVING),
    MODELS: (RUNTIME, EXPORT, CHECK, BUILD, CLI, SERVING),
    RUNTIME: (MODELS, EXPORT, CHECK, BUILD, CLI, SERVING),
    EXPORT: (RUNTIME, CHECK, BUILD, CLI, SERVING),
    CHECK: (BUILD, CLI, SERVING),
    BUILD: (CLI, SERVING),
    SERVING: (MODELS, EXPORT, CHECK, BUILD, CLI),
    "train": (CLI,),
    "bench": (CLI,),
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


def _violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(module, forbidden room) for every import against the layering in ``graph`` (module -> names imported)."""
    found = set()
    for module, names in graph.items():
        banned = next((rooms for room, rooms in FORBIDDEN.items() if _within(module, room)), ())
        found |= {(module, high) for high in banned for name in names if _within(name, high)}
    return found


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    graph = _graph()
    assert {"onex_export.runtime.pipeline", "onex_export.check.reference", "onex_export.build.run"} <= set(graph)
    assert _violations(graph) == set()


def test_the_rule_sees_an_arrow_against_it():
    """Negative: the check is not vacuous (a runtime module importing the exporter, a bench module the CLI)."""
    graph = {"onex_export.runtime.pipeline": {"onex_export.export.graphs", "onex_export.contract"},
             "bench.latency": {"onex_export.cli"}, "onex_export.check.gate": {"onex_export.export.graphs"}}
    assert _violations(graph) == {("onex_export.runtime.pipeline", EXPORT), ("bench.latency", CLI)}


def test_no_two_packages_import_each_other():
    arrows = set()
    for module, names in _graph().items():
        if module == "onex_export":  # the package's facade re-exports the runtime lazily; every room runs it
            continue
        source = _package(module)
        arrows |= {(source, target) for target in map(_package, names) if target and target != source}
    cycles = {frozenset(pair) for pair in arrows if pair[::-1] in arrows}
    assert cycles == set(), "import cycles between packages"
