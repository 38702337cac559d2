"""An installed minidream beside the rest of the ecosystem (run by .ci/run in a venv that holds minidream and
transformers, from a folder outside the checkout): the distribution puts one name on the import path, `minidream`;
transformers imports and loads a model class; the `kernels` found is Hugging Face's; none of the names minidream once
installed at the top (cli, kernels, benchmarks, weights) resolves to minidream's code. Exit 1 with what is wrong."""
import importlib.metadata as metadata
import importlib.util
import sys
from pathlib import Path


def top_level_names(dist) -> set[str]:
    """Every top-level import name the distribution provides: its top_level.txt, the packages its files install,
    and (an editable install) the names its import finder maps."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or ():
        parts = Path(str(f)).parts
        if parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".pth")):
            continue
        if parts[0].startswith("__editable__") and parts[0].endswith("_finder.py"):
            finder = {}
            exec(compile(Path(dist.locate_file(f)).read_text(), str(f), "exec"), finder)
            names |= {k.split(".")[0] for k in finder.get("MAPPING", {})}
            continue
        names.add(parts[0].removesuffix(".py"))
    return names


def main() -> int:
    problems = []
    dist = metadata.distribution("minidream")
    names = top_level_names(dist)
    if names != {"minidream"}:
        problems.append(f"the minidream distribution installs the top-level names {sorted(names)}, not only minidream")
    import transformers
    try:  # a model class loads Hugging Face's kernels package (transformers >= 5.25)
        from transformers import CLIPTextConfig, CLIPTextModel
        CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    except ImportError as e:
        problems.append(f"transformers cannot load a model class: {e}")
    spec = importlib.util.find_spec("kernels")
    huggingface = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    if spec is None or not spec.origin or Path(spec.origin).resolve() != huggingface:
        problems.append(f"`import kernels` finds {spec and spec.origin}, not Hugging Face's kernels ({huggingface})")
    for name in ("cli", "benchmarks", "weights"):
        found = importlib.util.find_spec(name)
        if found is not None:
            problems.append(f"`import {name}` finds {found.origin}: minidream must not put {name} on the path")
    print(f"transformers {transformers.__version__}; kernels from {spec and spec.origin}; "
          f"minidream's top-level names: {sorted(names)}")
    for p in problems:
        print("problem:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
