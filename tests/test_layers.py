"""The layers of the design: app -> explorer -> backends -> transformers, and nothing heavy at import."""

import ast
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
        ("explorer", {"gradio"}),
        ("backends", {"gradio", "explorer", "app"}),
    ],
)
def test_imports_flow_one_way(folder, forbidden):
    for path in (ROOT / folder).rglob("*.py"):
        assert not imports(path) & forbidden, f"{path.relative_to(ROOT)} imports {imports(path) & forbidden}"


def test_importing_the_library_loads_no_model_code():
    code = "import explorer, backends, sys; print(sorted(m for m in sys.modules if 'modeling_' in m or m == 'gradio'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_code_pins_a_device_or_a_path():
    for path in [*ROOT.glob("explorer/**/*.py"), *ROOT.glob("backends/*.py")]:
        text = path.read_text()
        assert ".cuda()" not in text and "/home/" not in text and "cuda:0" not in text, path
