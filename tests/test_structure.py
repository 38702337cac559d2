"""The shape of the code the README promises: no file over 450 lines (cli.py, the commands, over 300: their options
are declared in cli_options.py and training/config.py), no function over 60, no line over 120
columns (ruff, which also finds unused imports and undefined names), no import cycle between the package's modules
(imports inside functions included), and the layers importing one way only, as each folder's docstring says."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import minidream

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("minidream/**/*.py"), *ROOT.glob("benchmarks/*.py")])
SHARED = {"minidream", "minidream.progress", "minidream.plots", "minidream.image_files", "minidream.options"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every first-party module `path` imports, at the top or inside a function."""
    names = {module_name(p) for p in SOURCES}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from minidream import lora`
        elif isinstance(node, ast.ImportFrom) and node.level:  # the benchmarks' `from .common import timeit`
            package = module_name(path).rsplit(".", node.level)[0]
            out |= {f"{package}.{node.module}" if node.module else f"{package}.{a.name}" for a in node.names}
    return {n for n in out if n in names}


def layer(module: str) -> str | None:
    """The folder a module lives in: minidream.training.step -> training; minidream.image_files -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "minidream" and len(parts) > 1 and (ROOT / "minidream" / parts[1]).is_dir() else None


def allowed_layers() -> dict[str, set[str]]:
    """Each folder's "May import:" line in its docstring: the layers it may import (besides itself)."""
    out = {}
    for init in sorted(ROOT.glob("minidream/*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import:" in doc, f"{init}: its docstring says what lives there and what it may import"
        line = doc.split("May import:", 1)[1].split("\n\n")[0]
        out[init.parent.name] = set(re.findall(r"minidream\.(\w+)", line)) - {m.split(".")[-1] for m in SHARED}
    return out


def test_no_file_over_450_lines_and_no_function_over_60():
    long_files = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 450}
    assert not long_files
    assert len((ROOT / "minidream" / "cli.py").read_text().splitlines()) <= 300
    long_functions = []
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{module_name(p)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_functions


def test_no_line_over_120_columns_and_no_unused_imports():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in SOURCES}
    cycles = []

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        visit(start, [start])
    assert not cycles, cycles[0]


def test_imports_flow_one_way():
    """A module imports its own folder, the folders its folder's docstring names, and the shared modules; a shared
    module imports no folder; the kernels import nothing of minidream (their docstring says so). (The entry points,
    minidream/cli.py with minidream/cli_common.py, and minidream/__main__.py, sit on top.)"""
    allowed = allowed_layers()
    assert set(allowed) == {"kernels", "models", "sampling", "formats", "training", "inspect", "demo"}, sorted(allowed)
    for p in SOURCES:
        name = module_name(p)
        used = {layer(m) for m in imports(p)} - {None}
        own = layer(name)
        if name in SHARED:
            assert not used, (name, used)
        elif own is not None:
            assert used <= allowed[own] | {own}, (name, used - allowed[own] - {own})
    assert not allowed["kernels"]
    for p in ROOT.glob("minidream/kernels/*.py"):
        assert all(m.startswith("minidream.kernels") for m in imports(p) - SHARED), module_name(p)
    assert minidream.__doc__ and all(f"    {folder}" in minidream.__doc__ for folder in allowed)


def test_the_references_stay_out_of_the_product():
    """minidream/ (the kernels and the command line included) never imports the numerical references (diffusers,
    transformers, peft)."""
    for p in SOURCES:
        name = module_name(p)
        if name.startswith("minidream"):
            tree = ast.parse(p.read_text())
            mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not {m.split(".")[0] for m in mods} & {"diffusers", "transformers", "peft"}, name
