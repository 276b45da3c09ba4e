"""The package's shape, as the README's Layout section promises it: the NOLA method modules stand alone (nothing
from the run machinery in nola.training), and every function is short enough to read in one screen."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "nola"
METHOD_MODULES = ("basis", "fused", "autograd", "matrices", "layers", "quant", "inject", "svd_init", "adapter_config",
                  "adapter_io", "lora_form", "methods/__init__", "methods/base", "methods/nola", "methods/lora",
                  "methods/vera", "peft/__init__", "peft/config", "peft/layer", "peft/model", "peft/convert",
                  "serving/__init__", "serving/store", "serving/lora_cache")
MAX_FUNCTION_LINES = 80


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_method_modules_import_nothing_from_the_run_machinery():
    for name in METHOD_MODULES:
        imports = imported_modules(PACKAGE / f"{name}.py")
        assert not {m for m in imports if m.startswith("nola.training")}, f"nola/{name}.py imports {imports}"
    loaded = subprocess.run([sys.executable, "-c", "import sys, nola; print(sorted(sys.modules))"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "nola.training" not in loaded and "accelerate" not in loaded  # `import nola` is the method alone
    assert "'peft'" not in loaded and "'nola.peft'" not in loaded  # PEFT is an optional extra (nola[peft])


def test_the_serving_modules_load_no_training_engine():
    """A server process (vLLM's, with nola's adapter store) gets the method core only: none of the engines, data
    or logging packages that training brings, and no nola.training."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, nola.serving.store, nola.serving.lora_cache; "
                             "print(' '.join(sorted(sys.modules)))"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    engines = ("deepspeed", "bitsandbytes", "accelerate", "peft", "trl", "wandb", "datasets")
    assert "nola.serving.lora_cache" in loaded
    assert not [m for m in loaded if m.split(".")[0] in engines or m.startswith("nola.training")]


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
