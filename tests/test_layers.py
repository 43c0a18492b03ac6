"""The layers of the design: app -> explorer -> backends -> transformers, and nothing heavy at import."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("explorer/methods", {"transformers", "gradio", "backends"}),
        ("explorer", {"gradio", "ui", "app"}),
        ("backends", {"gradio", "explorer", "ui", "app"}),
        ("ui", {"app"}),
    ],
)
def test_imports_flow_one_way(folder, forbidden):
    for path in (ROOT / folder).rglob("*.py"):
        assert not imports(path) & forbidden, f"{path.relative_to(ROOT)} imports {imports(path) & forbidden}"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("explorer.engine", {"explorer.views", "explorer.evaluation", "explorer.cli"}),
        ("explorer.views", {"explorer.evaluation", "explorer.cli"}),
        ("explorer.evaluation", {"explorer.cli"}),
        ("explorer.methods", {"explorer.engine", "explorer.views", "explorer.evaluation", "explorer.cli"}),
    ],
)
def test_the_library_s_sub_packages_import_one_way(package, forbidden):
    """The engine knows nothing of the views, the views nothing of the evaluation."""
    known = modules()
    for name, path in known.items():
        if name == package or name.startswith(package + "."):
            wrong = {m for m in imported(name, path, known) if any(m == f or m.startswith(f + ".") for f in forbidden)}
            assert not wrong, f"{name} imports {wrong}"


def test_importing_the_library_loads_no_model_code():
    code = "import explorer, backends, sys; print(sorted(m for m in sys.modules if 'modeling_' in m or m == 'gradio'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_code_pins_a_device_or_a_path():
    for path in [*ROOT.glob("explorer/**/*.py"), *ROOT.glob("backends/*.py")]:
        text = path.read_text()
        assert ".cuda()" not in text and "/home/" not in text and "cuda:0" not in text, path


def modules() -> dict[str, Path]:
    """Every module of the project by its dotted name: app, explorer.*, backends.*."""
    files = [ROOT / "app.py", *ROOT.glob("ui/*.py"), *ROOT.glob("explorer/**/*.py"), *ROOT.glob("backends/*.py")]
    named = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        named[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return named


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file, inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names}
    return {module for module in found if module in known and module != name}


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)) for nxt in graph[start]
        )

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, f"import cycles through {cycles}"


def test_the_code_stays_small():
    """backends/base.py holds only what every family shares; no function runs over 60 lines."""
    assert len((ROOT / "backends/base.py").read_text().splitlines()) <= 350
    for path in [ROOT / "app.py", *ROOT.glob("ui/*.py"), *ROOT.glob("explorer/**/*.py"), *ROOT.glob("backends/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} is {length} lines"


def test_the_app_is_wiring_around_small_rooms():
    """app.py parses, builds and launches; each tab's module stays under 400 lines and each class under 150,
    and no code rewrites a function's signature for Gradio."""
    assert len((ROOT / "app.py").read_text().splitlines()) <= 150
    for path in [ROOT / "app.py", *ROOT.glob("ui/*.py")]:
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path.name
        assert "__signature__" not in text, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 150, f"{path.name}: class {node.name}"


def test_methods_are_read_through_their_declared_interface():
    """`explorer.core.Method` declares every optional attribute once: nothing probes a method for one."""
    for path in [ROOT / "app.py", *ROOT.glob("ui/*.py"), *ROOT.glob("explorer/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
            ):
                probed = ast.unparse(node.args[0])
                assert not re.search(r"\b(method|chosen|cls|METHODS)\b", probed), f"{path.name}: {ast.unparse(node)}"
