"""Weight files: finding them (a local path, or a hub repo fetched into the Hugging Face cache), reading
them (safetensors memory-mapped; pickles only when asked, then weights-only), writing them atomically,
and putting their tensors into modules strictly.

Models are built on the `meta` device and take the memory-mapped safetensors tensors as their
parameters (`assign=True`): no random init, no second copy in RAM. Only safetensors load unless
the caller passes allow_pickle=True (then `torch.load(weights_only=True)`, which refuses code).
"""
import ctypes
import json
import mmap
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# The weights file of each component in the diffusers layout (`<stem>[.variant].safetensors`).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}


# Models that ship inside minidream, by name: `--model demo` in every command, from any folder and any install (a
# local file or folder of that name wins). The path is package data (demo/weights), found without importing it.
SHIPPED = {"demo": Path(__file__).resolve().parent.parent / "demo" / "weights"}


class ModelError(Exception):
    """A problem with a model on disk, worded for the user (one line, names the path)."""


def name_some(keys, n: int = 4) -> str:
    """A few of `keys` for an error message: "a, b, c, d and 12 more"."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Finding the files

def resolve(model: str, revision: str | None = None, allow_pickle: bool = False, variant: str | None = None,
            weights: bool = True, t5: bool = True) -> Path:
    """A local folder or single file as is; a shipped model's name (SHIPPED); otherwise a hub repo id, fetched
    (configs, tokenizers and the component weights only; weights=False: no weights, for a single file's
    --original-config or vocabulary) into the standard Hugging Face cache (t5=False: not SD3's T5 either).
    HF_HUB_OFFLINE=1 serves the cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model in SHIPPED:
        return SHIPPED[model]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelError(f"{model}: no such file or folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    var = f".{variant}" if variant else ""
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                "tokenizer_3/*"]
    for comp, stem in WEIGHT_STEMS.items() if weights else ():
        if comp == "text_encoder_3" and not t5:
            continue
        patterns += [f"{comp}/{stem}{var}.safetensors", f"{comp}/{stem}{var}-*-of-*.safetensors",
                     f"{comp}/{stem}.safetensors.index{var}.json"]  # a sharded component: its index and shards
        if allow_pickle:
            patterns.append(f"{comp}/{stem}{var}.bin")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline without a cached copy, unknown repo, gated repo, no network
        raise ModelError(f"{model}: no such local file or folder, and it could not be fetched as a Hugging Face hub "
                         f"repo ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path, "
                         f"or the repo id and your login / network") from None


def weight_file(folder: Path, stem: str, variant: str | None, allow_pickle: bool) -> Path:
    """The component's weights: one safetensors file, or the index of its shards (`<stem>.safetensors.index.json`,
    how the hub stores a large transformer or T5; a variant's as diffusers and transformers name it,
    `<stem>.safetensors.index.fp16.json`)."""
    variants = [variant] if variant else [None, "fp16"]
    names = [f"{stem}{'.' + v if v else ''}.safetensors" for v in variants]
    for v, n in zip(variants, names):
        for f in (folder / n, folder / f"{stem}.safetensors.index{'.' + v if v else ''}.json"):
            if f.exists():
                return f
    pickles = [folder / n.replace(".safetensors", ".bin") for n in names]
    for p in pickles:
        if p.exists():
            if allow_pickle:
                return p
            raise ModelError(f"{p}: pickle checkpoints can run code when loaded and are refused; convert it to "
                             f"safetensors, or pass --allow-pickle if you trust the file")
    raise ModelError(f"{folder}: no weights ({' or '.join(names)}); is the download complete?")


def read_weights(file: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    file = Path(file)
    if not file.is_file():  # a FIFO or device would block the reader forever
        raise ModelError(f"{file}: not a regular file")
    if ".safetensors.index" in file.name and file.suffix == ".json":
        return read_shards(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(file)  # memory-mapped
        except Exception as e:
            raise ModelError(f"{file}: not a readable safetensors file ({e}); it may be truncated: download it "
                             f"again") from None
    if file.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        if not allow_pickle:
            raise ModelError(f"{file}: pickle checkpoints can run code when loaded and are refused; convert it to "
                             f"safetensors, or pass --allow-pickle if you trust the file")
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-1.6, non-zip) pickles cannot be memory-mapped: read them whole
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{file}: could not be read as a weights-only torch checkpoint "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(sd, dict):
            raise ModelError(f"{file}: holds a {type(sd).__name__}, not a dict of tensors")
        return sd.get("state_dict", sd)
    raise ModelError(f"{file}: unknown weights format; expected .safetensors")


def read_shards(index: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, each from the shard its index names (all shards memory-mapped)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index}: no weight_map of tensor names to shard files; download it again")
    sd = {}
    for shard in sorted(set(weight_map.values())):
        f = index.parent / shard
        if Path(shard).name != shard or not f.exists():
            raise ModelError(f"{f}: a shard {index.name} names is missing; is the download complete?")
        if f.suffix != ".safetensors":
            raise ModelError(f"{f}: shards must be .safetensors")
        part = read_weights(f)
        sd.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise ModelError(f"{index}: {name_some(missing)} not in the shard it names; download it again")
    return sd


MADV_PAGEOUT = 21  # Linux's madvise advice: reclaim these pages now (never discards what was written)


def mapped_files() -> list[tuple[int, int]]:
    """The address ranges where this process maps a safetensors file (/proc/self/maps: Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def give_back_pages(tensors: list[torch.Tensor]):
    """The pages of the file a memory-mapped tensor was read from, handed back to the kernel now rather than when the
    whole file's mapping goes: a layer quantized or cast as it loads keeps its new copy only. MADV_PAGEOUT reclaims
    a page only if that loses nothing (a page read from the file is read again if touched; one written in place
    stays, as there is no swap for it), and only ranges inside a mapped safetensors file are advised (Linux 5.4+;
    elsewhere nothing happens: the pages go with the mapping)."""
    if sys.platform != "linux" or not tensors:
        return
    files, page = mapped_files(), mmap.PAGESIZE
    for t in tensors:
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if t.device.type != "cpu" or not any(a <= lo and hi <= b for a, b in files):
            continue
        start, end = -(-lo // page) * page, hi // page * page  # whole pages only: a neighbour keeps its edges
        if end > start:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def read_json(file: Path) -> dict:
    if not file.exists():
        raise ModelError(f"{file}: missing; is this a diffusers-layout model folder?")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------------------------
# Putting tensors into modules

def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, dtype=None) -> nn.Module:
    """Strict load with errors that name the key, the file and the expected shape; the module is
    expected on `meta` and takes the given tensors as its own (assign=True)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    if missing:
        k = missing[0]
        raise ModelError(f"{source}: missing key {k!r} (expected shape {list(want[k].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [k for k in sd if k not in want]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ModelError(f"{source}: unexpected key {extra[0]!r}{more}; the checkpoint does not match the configured "
                         f"architecture")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelError(f"{source}: key {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


@contextmanager
def on_meta():
    """Modules built here are shapes only, their weights to be read from a checkpoint: torch.nn.init's fills are
    skipped (as transformers' no_init_weights does). On meta they fill nothing, and the first `normal_` there
    imports torch._dynamo: 2 s of every `sample`, `info` or `diff` (training pays it anyway: torch's optimizers
    import it too). The skipping is a torch function mode: it holds for this block and this thread only."""
    with torch.device("meta"), SkipInitFills():
        yield


class SkipInitFills(TorchFunctionMode):
    """torch.nn.init's fills return their tensor untouched (nn.init hands itself to an active function mode)."""
    FILLS = frozenset(getattr(nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
                                                    "xavier_uniform_", "xavier_normal_", "trunc_normal_", "zeros_",
                                                    "ones_", "constant_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build(cls, config, sd, source, dtype=None):
    try:
        with on_meta():
            model = cls(config)
    except Exception as e:  # a config that passed the checks but still describes no buildable model
        raise ModelError(f"{source}: its config does not describe a buildable {cls.__name__} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return load_into(model, sd, source, dtype).eval().requires_grad_(False)


def read_metadata(file: Path) -> dict:
    """A safetensors file's string metadata ({} for anything else, or an unreadable header)."""
    if Path(file).suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None,
                     dtype: torch.dtype | None = None):
    """Write atomically: a crash mid-write leaves the old file (or none), never half a file. A full or read-only
    disk is an OSError naming the file, as every other write's (safetensors says it in its own exception).
    `dtype`: every floating-point tensor written in it (--save-precision); None: as they are."""
    from safetensors.torch import save_file
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        try:
            save_file({k: cast(v.detach(), dtype).contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
        except Exception as e:
            code = re.search(r"os error (\d+)", str(e))
            if isinstance(e, OSError) or not code:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like any file the user writes (the writer makes it 0600)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def write_text(file: Path, text: str):
    """A text file (JSON, markdown) written atomically, as the weights are."""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
