"""The import rule of docs/architecture.md, checked over every import statement of the package
(function-local ones included, so a cycle cannot hide behind a late import):

    cli -> api, measure -> exporters -> passes -> runtime -> rewriter -> base (errors, signature, ...)
    models stands alone (base only)

Imports go down this list only; no pass imports another pass; there is no import cycle at all
(imports under `if TYPE_CHECKING:` never run: they obey the layers but make no cycle).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dittofx"

# layer of each top-level part of the package, highest first
LAYERS = {
    "__main__": 7, "cli": 6,
    "api": 5, "measure": 5,
    "exporters": 4,
    "passes": 3,
    "runtime": 2,
    "rewriter": 1,
    "errors": 0, "signature": 0, "report": 0, "_log": 0, "_torch_compat": 0,
}
STANDALONE = {"models"}  # may import only the base layer; imported by api, measure and cli
PASS_INFRASTRUCTURE = {"base", "spec", "manager"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _typing_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under `if TYPE_CHECKING:`."""
    return {n for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body for n in ast.walk(stmt)}


def _imports(path: pathlib.Path, run_time_only: bool = False) -> set[str]:
    """Every dittofx module `path` imports, at any depth of the file (those that run, if `run_time_only`)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    skip = _typing_only(tree) if run_time_only else set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for a in node.names:  # `from dittofx.passes import tome` imports the module dittofx.passes.tome
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
RUN_TIME_GRAPH = {_module_name(p): _imports(p, run_time_only=True) for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "dittofx"))
def test_imports_go_down(module):
    part = _part(module)
    for imported in GRAPH[module]:
        other = _part(imported)
        if other == part or imported == "dittofx":
            continue
        if part in STANDALONE:
            assert LAYERS.get(other) == 0, f"{module} imports {imported}: models/ imports only the base layer"
            continue
        if other in STANDALONE:
            assert LAYERS[part] >= LAYERS["api"], f"{module} imports {imported}: only api, measure and cli use models/"
            continue
        assert LAYERS[other] < LAYERS[part], (f"{module} (layer {part}) imports {imported} (layer {other}): "
                                              f"imports go down cli -> api, measure -> exporters -> passes -> "
                                              f"runtime -> rewriter -> base")


def test_api_and_measure_do_not_import_each_other():
    for module, imported in GRAPH.items():
        if _part(module) in ("api", "measure"):
            assert not {_part(m) for m in imported} & ({"api", "measure"} - {_part(module)}), module


def test_no_pass_imports_another_pass():
    def which_pass(module):
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "passes" and parts[2] not in PASS_INFRASTRUCTURE else None

    for module, imported in GRAPH.items():
        mine = which_pass(module)
        if mine is None:
            continue
        others = {which_pass(m) for m in imported} - {None, mine}
        assert not others, f"{module} imports the pass(es) {sorted(others)}: shared machinery belongs in rewriter/"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module, stack):
        state[module] = 1
        for imported in sorted(RUN_TIME_GRAPH.get(module, ())):
            if imported == "dittofx":
                continue
            if state.get(imported) == 1:
                cycle = stack[stack.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, stack + [imported])
        state[module] = 2

    for module in sorted(RUN_TIME_GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_check_sees_imports_inside_functions():
    # the old cycle hid behind function-local imports: make sure those are read
    assert "dittofx.exporters.onnx" in GRAPH["dittofx.exporters.onnx_pab"]
    assert any(m.startswith("dittofx.runtime") for m in GRAPH["dittofx.cli.bench"])


def test_typing_only_imports_obey_the_layers_but_make_no_cycle():
    assert "dittofx.passes.tome" in GRAPH["dittofx.passes.tome.vit"]  # `if TYPE_CHECKING: from ... import ToMe`
    assert "dittofx.passes.tome" not in RUN_TIME_GRAPH["dittofx.passes.tome.vit"]
    assert "dittofx.passes.tome.ops" in RUN_TIME_GRAPH["dittofx.passes.tome.vit"]
