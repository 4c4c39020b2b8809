"""The layout rules the README's design section promises, checked on the code itself.

Import direction between layers is import-linter's job (contracts in pyproject.toml, run by
.ci/run); these tests check what it cannot: heavy libraries imported only inside functions,
module and function sizes, and a light ``embedctl --help``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"

# Libraries that cost seconds to import or need a cluster/GPU: never at module level in engine/.
HEAVY = ("ray", "torch", "faiss", "sentence_transformers", "transformers", "onnxruntime", "openvino",
         "sklearn", "scipy", "matplotlib", "bm25s", "boto3", "botocore", "fastapi", "uvicorn", "datasets",
         "accelerate", "tiktoken", "tokenizers")
# Module-level imports of these are allowed where listed (module -> libraries), with the reason.
HEAVY_ALLOWED: dict[str, set[str]] = {
    # The ASGI app: its typed request models and routes are FastAPI objects at module level; only
    # `embedctl serve` (and the Ray Serve replicas) import this module.
    "engine/serve/app.py": {"fastapi"},
}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Longer ones, each with the reason the README's design section gives for keeping it whole.
LONG_FUNCTIONS: dict[str, str] = {}
LONG_MODULES: dict[str, str] = {}


def engine_modules() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_no_module_level_import_of_heavy_libraries() -> None:
    bad = []
    for path in engine_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:  # module level only; TYPE_CHECKING blocks are ast.If and are skipped
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in HEAVY and top not in HEAVY_ALLOWED.get(rel(path), set()):
                    bad.append(f"{rel(path)}:{node.lineno} imports {name}")
    assert not bad, "heavy imports at module level (move them into the function that needs them):\n" + "\n".join(bad)


def test_module_sizes() -> None:
    long = {rel(p): n for p in engine_modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    unexplained = {k: v for k, v in long.items() if k not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_MODULE_LINES} lines (split them by role): {unexplained}"


def test_function_sizes() -> None:
    long = {}
    for path in engine_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.lineno  # the def line: click options stacked as decorators are not body
                n = (node.end_lineno or start) - start + 1
                name = f"{rel(path)}:{node.name}"
                if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (break them into steps): {long}"


def test_help_is_light() -> None:
    """``embedctl --help`` imports no heavy library (so it answers at once)."""
    code = ("import sys; from engine.cli.app import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY")][-1]
    assert line == "HEAVY []", line


@pytest.mark.parametrize("verb", ["embed", "build-index", "search", "publish", "serve", "migrate", "refresh"])
def test_verb_help_is_light(verb: str) -> None:
    """A verb's ``--help`` imports its command module, still without heavy libraries."""
    code = ("import sys; from engine.cli.app import main\n"
            f"try:\n    main([{verb!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY")][-1]
    assert line == "HEAVY []", line
