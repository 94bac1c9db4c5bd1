"""The package's floors (README's layout): every import of ours points down, lazy imports inside functions
and ``"module:Class"`` strings included, and no two modules import each other."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xinf_llama_vision"

#: Module (or package) → floor, from the ground up: as README's layout lists them.
FLOORS = {
    "model_specs": 0, "errors": 0, "parsing": 0, "_version": 0, "weights": 0, "cpu_features": 0, "quantization": 0,
    "schema": 1, "memory": 1, "compat": 1, "generation": 1,
    "request": 2, "images": 2, "catalog": 2,
    "engines": 3, "vllm_model": 3,
    "registration": 4,
    "api": 5,
    "extension": 6, "__init__": 6,
    "docs": 7, "__main__": 7,
}
STRING = re.compile(r"xinf_llama_vision((?:\.\w+)+)(?::\w+)?$")


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """Every module of ours that ``path`` imports (at any depth) or names in a ``"module:Class"`` string."""
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("xinf_llama_vision"):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # "from . import x" names a module
                yield ".".join(base + [alias.name]) if (PACKAGE.joinpath(*base, alias.name + ".py").exists()
                                                        or PACKAGE.joinpath(*base, alias.name).is_dir()) else ".".join(base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("xinf_llama_vision."):
                    yield alias.name.split(".", 1)[1]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and STRING.match(node.value):
            yield STRING.match(node.value).group(1)[1:]


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0] or "__init__"]


MODULES = {_name(p): sorted(set(i for i in _imports(p) if i)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    assert {m.split(".")[0] for m in MODULES} - {"__init__"} <= set(FLOORS), sorted(set(m.split(".")[0] for m in MODULES) - set(FLOORS))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    top = module.split(".")[0]
    upward = [i for i in MODULES[module] if i.split(".")[0] != top and _floor(i) >= _floor(module)]
    assert not upward, f"{module} (floor {_floor(module)}) imports {upward}"


def test_no_two_modules_import_each_other():
    pairs = [(a, b) for a, deps in MODULES.items() for b in deps if a < b and a in MODULES.get(b, [])]
    assert not pairs, pairs
