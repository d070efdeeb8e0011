"""Dependencies point one way (DESIGN.md): model <- kernels, quant, adapters <- engine <- serve, eval <- data, train; api
composes them and cli/commands sit on top. talaria (the cost model) reads model, quant, adapters and kernels, and only
commands and api read it. export reads model and quant; only commands read it. Checked by reading imports."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pippin"
# For each package, the pippin packages it must not import.
FORBIDDEN = {
    "model": {"engine", "kernels", "commands", "api", "cli", "talaria", "export"},
    "kernels": {"engine", "commands", "api", "cli", "talaria", "export"},
    "engine": {"commands", "api", "cli", "quant", "train", "serve", "eval", "talaria", "export"},
    # quant acts on linear-like modules by name and never imports the model (DESIGN.md).
    "quant": {"model", "engine", "commands", "api", "cli", "talaria", "export"},
    # adapters wrap linear-like modules by name, like quant.
    "adapters": {"model", "engine", "quant", "train", "commands", "api", "cli", "talaria", "export"},
    "train": {"commands", "api", "cli", "serve", "talaria", "export"},
    "serve": {"commands", "cli", "train", "eval", "talaria", "export"},
    "eval": {"commands", "cli", "train", "serve", "data", "talaria", "export"},
    # data builds training sets with eval's checkers; train reads them.
    "data": {"commands", "api", "cli", "train", "serve", "engine", "talaria", "export"},
    # talaria prices a model from its config and modules; measuring the real kernels is allowed, running the engine not.
    "talaria": {"engine", "serve", "train", "eval", "data", "commands", "api", "cli", "export"},
    # export reads model and quant (the weights, LUTs and indices) and writes other runtimes' files.
    "export": {"engine", "serve", "train", "eval", "data", "adapters", "talaria", "commands", "api", "cli"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pippin."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pippin.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    for f in (PKG / package).rglob("*.py"):
        bad = imports(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(PKG)} imports pippin.{sorted(bad)}"
