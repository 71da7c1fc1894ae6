"""DESIGN §3: imports point down only. nn <- models <- convert <- inference <- cli/serve; data and training
never import models; recipes never import each other; nothing imports cli or serve."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "blip2"

ALLOWED: dict[str, set[str]] = {
    "nn": {"nn"},
    "models": {"nn", "models"},
    "convert": {"nn", "models", "convert"},
    "data": {"data"},
    "training": {"training", "data", "nn"},
    "inference": {"nn", "models", "convert", "data", "inference"},
    "eval.metrics": {"eval.metrics"},
    "eval": {"eval", "eval.metrics", "inference", "data", "convert", "models", "nn"},
    "recipes": {"recipes", "nn", "models", "convert", "data", "training", "inference", "eval", "eval.metrics"},
    "collections": {"collections", "inference", "data", "convert", "models", "nn"},
    "serve": {"serve", "collections", "inference", "data", "convert", "models", "nn"},
    "cli": {"cli", "inference", "data", "convert", "models", "nn", "training", "recipes", "eval", "eval.metrics", "serve",
            "collections"},
}


def _package(module: str) -> str:
    parts = module.split(".")[1:]  # drop "blip2"
    if not parts:
        return ""
    if parts[0] == "eval" and len(parts) > 1 and parts[1] == "metrics":
        return "eval.metrics"
    return parts[0]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("blip2")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blip2") and node.level == 0:
            found.append(node.module)
    return found


def test_imports_point_down():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        module = "blip2." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        owner = _package(module)
        if owner in ("", "__main__"):
            continue  # the top-level package re-exports the public API lazily
        for target in _imports(path):
            dest = _package(target)
            if owner == "recipes" and dest == "recipes" and module != "blip2.recipes" and target != "blip2.recipes":
                if target != module:
                    problems.append(f"{module} imports another recipe {target}")
                continue
            if dest and dest not in ALLOWED.get(owner, set()):
                problems.append(f"{module} imports {target}")
    assert not problems, "imports that point the wrong way:\n" + "\n".join(problems)


def test_cli_import_is_light():
    import subprocess
    import sys

    code = "import sys, blip2.cli; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
