"""The concepts a run trains: the `--concepts FILE.json` entries (each `{instance_dir, instance_prompt | identifier +
class_noun, class_prompt, class_dir, num_class_images}`, stored in the run's config, so a run resumes without the
file), or the one concept the command line describes. Read and checked here, before anything is written; their
images are concepts.py's.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from minidream.options import text
from minidream.training import TrainError

KEYS = ("instance_dir", "instance_prompt", "identifier", "class_noun", "class_prompt", "class_dir", "num_class_images")
MAX_CLASS_IMAGES = 100_000  # per concept: more would only exhaust the disk and the time


def concepts_file(path) -> tuple[dict, ...]:
    """The file's entries (checked as the --concepts setting is: `check_concepts`)."""
    if path is None:
        return ()
    if not str(path).strip():
        raise TrainError("--concepts is empty; name a JSON file")
    path = Path(path)
    if not path.is_file():  # a folder, or a FIFO, which would block the reader forever
        raise TrainError(f"--concepts {path}: not a file; give a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"--concepts {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, list) or not data or not all(isinstance(c, dict) for c in data):
        raise TrainError(f"--concepts {path}: expected a non-empty list of objects, one per concept")
    wrong = check_concepts(tuple(data))
    if wrong:
        raise TrainError(f"--concepts {path}: {wrong}")
    return tuple(data)


def word(v) -> str | None:
    """An identifier: one word the prompts can hold (no spaces; <, > are what --train-token adds)."""
    if not isinstance(v, str) or not v or any(c.isspace() for c in v) or "<" in v or ">" in v:
        return f"{v!r} is not one word (e.g. sks)"
    return text(v)


def _text(c: dict, key: str) -> bool:
    return isinstance(c.get(key), str) and c[key].strip() != "" and text(c[key]) is None


def check_concepts(entries: tuple) -> str | None:
    """What is wrong with the first bad entry, or None."""
    for k, c in enumerate(entries):
        if not isinstance(c, dict):
            return f"concept {k} is not an object"
        unknown = set(c) - set(KEYS)
        if unknown:
            return f"concept {k} has unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KEYS))})"
        if not _text(c, "instance_dir"):
            return f"concept {k} needs \"instance_dir\", a folder"
        if "identifier" in c and word(c["identifier"]):
            return f"concept {k}: identifier {word(c['identifier'])}"
        for key in ("instance_prompt", "class_prompt", "class_noun", "class_dir"):
            if key in c and not _text(c, key):
                return f"concept {k}: {key} must be non-empty UTF-8 text (got {c[key]!r})"
        if not (_text(c, "instance_prompt") or ("identifier" in c and _text(c, "class_noun"))):
            return f"concept {k} needs \"instance_prompt\", or \"identifier\" and \"class_noun\""
        if not (_text(c, "class_prompt") or _text(c, "class_noun")):
            return f"concept {k} needs \"class_prompt\" or \"class_noun\""
        n = c.get("num_class_images", 0)
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_CLASS_IMAGES):
            return f"concept {k}: num_class_images must be an integer in [0, {MAX_CLASS_IMAGES}] (got {n!r})"
    return None


@dataclass(frozen=True)
class Concept:
    instance_dir: Path
    instance_prompt: str
    class_prompt: str
    class_dir: Path
    num_class_images: int
    identifier: str


def concepts(cfg, out: Path) -> list[Concept]:
    """The run's concepts (`cfg`: its TrainConfig): the --concepts entries, or the one the command line describes."""
    if not cfg.concepts:
        return [Concept(Path(cfg.instance_dir), cfg.prompts[0], cfg.prompts[1],
                        Path(cfg.class_dir) if cfg.class_dir else out / "class_images", cfg.num_class_images,
                        cfg.identifier)]
    rows = []
    for k, c in enumerate(cfg.concepts):
        ident = c.get("identifier", cfg.identifier)
        token = f"<{ident}>" if cfg.train_token else c.get("identifier")
        instance_prompt = c.get("instance_prompt") or f"a photo of {token} {c['class_noun']}"
        rows.append(Concept(Path(c["instance_dir"]), instance_prompt,
                            c.get("class_prompt") or f"a photo of {c['class_noun']}",
                            Path(c["class_dir"]) if c.get("class_dir") else out / "class_images" / f"concept-{k}",
                            c.get("num_class_images", cfg.num_class_images), ident))
    return rows


def check_run_concepts(cfg, out: Path):
    """What the concepts ask of each other and of the run folder, before anything is written."""
    rows = concepts(cfg, out)
    where = (lambda k: f"concept {k}'s ") if cfg.concepts else (lambda k: "the ")
    dirs = {}
    for k, c in enumerate(rows):
        if c.instance_dir.resolve() == out.resolve():
            raise TrainError(f"--out {out} is {where(k)}instance folder: the run's files would be read as photos; "
                             f"choose another --out")
        photos = {r.instance_dir.resolve(): j for j, r in enumerate(rows)}
        if cfg.prior and c.class_dir.resolve() in photos:
            whose = "its" if photos[c.class_dir.resolve()] == k else f"concept {photos[c.class_dir.resolve()]}'s"
            raise TrainError(f"{where(k)}class images folder {c.class_dir} is {whose} instance folder: the photos "
                             f"would serve as class images; choose another --class-dir")
        if cfg.prior and c.class_dir.resolve() == out.resolve():
            raise TrainError(f"{where(k)}class images folder {c.class_dir} is --out: the run's own images (curves, "
                             f"grids) would be read as class images; choose another --class-dir")
        if cfg.prior and c.num_class_images < 1:
            raise TrainError(f"{where(k)}num_class_images is 0 with prior preservation: give it at least 1, or "
                             f"pass --no-prior")
        if cfg.prior and dirs.setdefault(c.class_dir.resolve(), k) != k:
            raise TrainError(f"concepts {dirs[c.class_dir.resolve()]} and {k} share the class folder {c.class_dir}; "
                             f"give each its own class_dir")
    if cfg.train_token and len({c.identifier for c in rows}) > 1:
        raise TrainError(f"--train-token learns one token; the concepts name {len({c.identifier for c in rows})} "
                         f"identifiers ({', '.join(sorted({c.identifier for c in rows}))}): use one")
