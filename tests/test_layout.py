"""The package layout: each top-level folder imports only from the layers below its own, and nothing cycles.

Read from the source with `ast` (every `import` and `from ... import`, in functions too, relative ones resolved),
so a new upward import or cycle fails here with the file, the line and the rule it breaks, before it grows into
the knot the layers were cut out of. The layers, bottom first, and what each folder owns, are in README.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

# Bottom first. A folder may import from the folders of lower layers only: not from its own layer's other folders,
# not from a layer above. `train.py` and `bench/` are entry points on top: nothing imports them.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),  # keys, ranks, atomic files, metric sums: no project import
    ("config",),  # the typed schema, source specs, the DeepSpeed JSON
    ("embedded",),  # the tiny default model, its tokenizer and sample data
    ("modeling",),  # loading a model and its tokenizer
    ("data_pipeline",),  # sources -> canonical dialogues -> tokens with labels -> batches
    ("dft", "observability", "preference"),  # the loss and its Trainer; logs, metrics, trackers; pair losses
    ("cluster", "evaluation"),  # checkpoints, resume, resilience, export, preflight; held-out evaluation
    ("trainer",),  # the run's Trainer, assembled from the mixins above
    ("train", "bench"),  # entry points
)
LAYER_OF = {folder: index for index, folders in enumerate(LAYERS) for folder in folders}
NOT_PYTHON_PACKAGES = ("conf", "ds_config", "launch", "data", "docs", "scripts", "tests")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `path`; `from a import b` gives `a.b` when that is a module."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def project_files(root: Path) -> dict[str, Path]:
    """Every project Python file outside tests and the virtual environment, by module name."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0].startswith(".") or relative.parts[0] in NOT_PYTHON_PACKAGES or "build" in relative.parts:
            continue
        files[module_name(path, root)] = path
    return files


def layering_problems(root: Path) -> list[str]:
    """Every import that breaks the layer rule, and every import cycle between project modules."""
    files = project_files(root)
    problems = []
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        folder = name.split(".")[0]
        if folder not in LAYER_OF:
            problems.append(f"{path.relative_to(root)}: top-level '{folder}' is in no layer of LAYERS")
            continue
        reported = set()
        for line, imported in imports_of(path, root):
            target_folder = imported.split(".")[0]
            if target_folder not in LAYER_OF and target_folder not in files:
                continue  # the standard library or a third-party package
            if imported in files and imported != name:
                graph[name].add(imported)
            if target_folder == folder or (line, target_folder) in reported:
                continue
            reported.add((line, target_folder))
            where = f"{path.relative_to(root)}:{line}: {folder} imports {imported}"
            if target_folder not in LAYER_OF:
                problems.append(f"{where}, which is in no layer")
            elif LAYER_OF[target_folder] == LAYER_OF[folder]:
                problems.append(
                    f"{where}: same layer ({', '.join(LAYERS[LAYER_OF[folder]])}), so neither may import the other"
                )
            elif LAYER_OF[target_folder] > LAYER_OF[folder]:
                problems.append(f"{where}: an upward import (layer {LAYER_OF[folder]} -> {LAYER_OF[target_folder]})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in find_cycles(graph)]
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (depth-first search)."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_packages_import_only_downward_and_never_in_a_cycle() -> None:
    problems = layering_problems(REPO_ROOT)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_layer_folder_exists() -> None:
    # A renamed folder must be renamed here too, or its imports would go unchecked.
    missing = [f for f in LAYER_OF if not (REPO_ROOT / f).is_dir() and not (REPO_ROOT / f"{f}.py").is_file()]
    assert not missing


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"core/a.py": "import dft.loss\n", "dft/loss.py": ""}, "core/a.py:1: core imports dft.loss: an upward import"),
        ({"dft/a.py": "from observability import x\n", "observability/x.py": ""}, "same layer"),
        (
            {"config/a.py": "def f():\n    from train import main\n", "train.py": ""},
            "config/a.py:2: config imports train",
        ),
        ({"oops/a.py": ""}, "top-level 'oops' is in no layer"),
        ({"dft/a.py": "from . import b\n", "dft/b.py": "from dft import a\n"}, "import cycle: dft.a -> dft.b -> dft.a"),
        ({"cluster/a.py": "from ..core import keys\n", "core/keys.py": ""}, None),
    ],
)
def test_the_check_fails_on_what_it_forbids(tmp_path: Path, files: dict[str, str], expected: str | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = layering_problems(tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in problem for problem in problems), problems


def test_tests_share_helpers_through_one_module() -> None:
    # A test module importing another test module couples two tests; shared code lives in tests/helpers.py.
    tests_dir = REPO_ROOT / "tests"
    crossing = [
        f"{path.relative_to(REPO_ROOT)}:{line}: imports {imported}"
        for path in sorted(tests_dir.rglob("*.py"))
        for line, imported in imports_of(path, REPO_ROOT)
        if imported.startswith("tests.") and not imported.startswith("tests.helpers")
    ]
    assert not crossing, "\n".join(crossing)
