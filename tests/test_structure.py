"""The shape of the code the README promises: no file over 450 lines, no function over 100, no import cycle
between the package's modules (imports inside functions included), and the model side free of the trainer."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("minidream/**/*.py"), *ROOT.glob("kernels/*.py"), ROOT / "cli.py", *ROOT.glob("benchmarks/*.py")])


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
    return {n for n in out if n in names}


def test_no_file_over_450_lines_and_no_function_over_100():
    long_files = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 450}
    assert not long_files
    long_functions = []
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long_functions.append(f"{module_name(p)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_functions


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


def test_layers():
    """Models and loaders never import the trainer; kernels never import the benchmarks; minidream/ never
    imports the numerical references (diffusers, transformers, peft)."""
    model_side = ("minidream.unet", "minidream.vae", "minidream.clip", "minidream.attention", "minidream.model",
                  "minidream.files", "minidream.diffusers_layout", "minidream.single_file", "minidream.loading",
                  "minidream.pipeline", "minidream.schedulers", "minidream.lora")
    trainer = {"minidream.train", "minidream.data", "minidream.checkpoint", "minidream.trainable", "minidream.export",
               "minidream.config"}
    for p in SOURCES:
        name = module_name(p)
        if name in model_side:
            assert not imports(p) & trainer, name
        if name.startswith("kernels"):
            assert not any(m.startswith("benchmarks") for m in imports(p)), name
        if name.startswith(("minidream", "kernels")) or name == "cli":
            tree = ast.parse(p.read_text())
            mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not {m.split(".")[0] for m in mods} & {"diffusers", "transformers", "peft"}, name
