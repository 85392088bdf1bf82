"""The floor plan: every project import points down the layers, and the import graph has no cycle.

Layers, lowest first (README, Repository): a module may import its own layer and those below it.
Function-level imports count like the others, so a cycle cannot hide inside a function.
"""

import ast

import pytest

from tests.conftest import REPO

LAYERS = [
    "pretrain.core",  # errors, process group, atomic files, the checkpoint format, reading weights
    "pretrain.data",  # manifest, shard tars and locations, decoding, views, the loader
    "pretrain.models",  # timm encoders and the pieces methods share
    "pretrain.methods",  # one file per method: its config section, views and objective
    "pretrain.config",  # the run config: the shared sections and every method's
    "pretrain.graft",  # layer-wise rules, starting weights, L1 pull, automatic split
    "pretrain.evaluation",  # features, kNN, probes, supervised results, analyses, the monitors
    "pretrain.training",  # the DeepSpeed engine and what only it uses
    "pretrain",  # the commands: train, eval, export, analysis, demo, launch
    "data_prep",  # the shard-writing commands, on top of pretrain.core and pretrain.data
    "slurm",  # lg-submit
]
# data_prep writes what the data layer reads: it needs nothing above it
ALLOWED_BELOW = {"data_prep": {"pretrain.core", "pretrain.data", "data_prep"}}
# Project imports inside functions, each for a reason other than a cycle.
LATE_IMPORTS = {
    (
        "pretrain.train",
        "pretrain.training.engine",
    ): "deepspeed picks its accelerator at import: DS_ACCELERATOR first",
    ("slurm.submit", "pretrain.train"): "lg-submit starts without torch; only the Slurm task trains",
}
PACKAGES = ("pretrain", "data_prep", "slurm")


def project_modules():
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def layer_of(module):
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def imports_of(path, modules):
    """(imported project module, line, inside a function) for every import statement of the file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(
                    (alias.name, child.lineno, in_function)
                    for alias in child.names
                    if alias.name.split(".")[0] in PACKAGES
                )
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and child.module.split(".")[0] in PACKAGES
            ):
                for alias in child.names:  # `from pretrain.core import checkpoint` imports a module
                    submodule = f"{child.module}.{alias.name}"
                    found.append(
                        (submodule if submodule in modules else child.module, child.lineno, in_function)
                    )
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return modules, {module: imports_of(path, modules) for module, path in modules.items()}


def upward_imports(graph):
    modules, edges = graph
    problems = []
    for module, imported in edges.items():
        mine = layer_of(module)
        allowed = ALLOWED_BELOW.get(mine, set(LAYERS[: LAYERS.index(mine) + 1]))
        for target, line, _ in imported:
            if layer_of(target) not in allowed:
                problems.append(
                    f"{modules[module].relative_to(REPO)}:{line}: {module} ({mine}) imports {target} "
                    f"({layer_of(target)})"
                )
    return problems


def cycles(graph):
    """Every strongly connected component of more than one module (Tarjan), or with a self-import."""
    _, edges = graph
    adjacent = {
        module: sorted({target for target, _, _ in imported if target in edges})
        for module, imported in edges.items()
    }
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in adjacent[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in adjacent[module]:
                found.append(sorted(component))

    for module in adjacent:
        if module not in index:
            connect(module)
    return found


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    assert {layer_of(module) for module in modules} <= set(LAYERS)
    assert all(layer in modules for layer in LAYERS), "every layer is a package or module"


def test_imports_only_point_down(graph):
    assert upward_imports(graph) == []


def test_the_import_graph_has_no_cycle(graph):
    assert cycles(graph) == []


def test_no_late_import_of_a_project_module_but_the_listed_ones(graph):
    modules, edges = graph
    late = {
        (module, target) for module, imported in edges.items() for target, _, inside in imported if inside
    }
    assert late == set(LATE_IMPORTS)


def test_the_checks_catch_an_upward_import_and_a_cycle(graph):
    modules, edges = graph
    broken = {module: list(imported) for module, imported in edges.items()}
    broken["pretrain.core.errors"].append(("pretrain.training.engine", 1, True))
    assert any(
        "pretrain.core.errors (pretrain.core) imports pretrain.training.engine" in problem
        for problem in upward_imports((modules, broken))
    )
    assert any(
        {"pretrain.core.errors", "pretrain.training.engine"} <= set(component)
        for component in cycles((modules, broken))
    )
