"""The house's rules: layers point one way, the quantizer library stands alone, no import cycles, no re-exports."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, project_packages

PACKAGES = project_packages()
QUANTIZERS = "stage1_tokenizer.quantizers"
# what each layer may import of ours, bottom up (the quantizer library is checked on its own below)
ALLOWED = {
    "common": {"common"},
    "eval": {"common", "eval", QUANTIZERS},
    "stage1_tokenizer": {"common", "eval", "stage1_tokenizer"},
    "stage2_prior": {"common", "eval", "stage1_tokenizer", "stage2_prior"},
    "pipelines": {"common", "eval", "stage1_tokenizer", "stage2_prior", "pipelines"},
    "study": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top level or inside functions), relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return out


def ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def test_every_package_has_a_layer():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES) == set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_point_one_way(path):
    name = module_name(path)
    if name.startswith(QUANTIZERS):
        allowed_prefixes = {QUANTIZERS}
    else:
        allowed_prefixes = ALLOWED[name.split(".")[0]]
    bad = sorted(m for m in imports(path) if ours(m) and not any(m == a or m.startswith(a + ".") for a in allowed_prefixes))
    assert not bad, f"{name} imports {bad} from a layer above it or beside it"


@pytest.mark.parametrize("path", sorted((ROOT / "stage1_tokenizer" / "quantizers").rglob("*.py")),
                         ids=lambda p: p.name)
def test_the_quantizer_library_needs_only_the_standard_library_and_torch(path):
    """A user can copy ``stage1_tokenizer/quantizers`` alone, as with vector-quantize-pytorch."""
    foreign = sorted(m for m in imports(path) if m.split(".")[0] not in {"torch", "__future__"}
                     and m.split(".")[0] not in sys.stdlib_module_names and not m.startswith(QUANTIZERS))
    assert not foreign, f"{path.name} imports {foreign}"


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {m for m in imports(p) if m in MODULES and m != module_name(p)} for p in SOURCES}
    for module, deps in graph.items():  # a package's __init__ importing its own modules is not a cycle through it
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_re_exports_anothers_helpers():
    """An unused import kept for others (``# noqa: F401``) hides where a name lives; only a package's ``__init__``
    gathers its own modules."""
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if p.name != "__init__.py" and "F401" in p.read_text()]
    assert not offenders
