"""The concepts a run trains: the `--concepts FILE.json` entries (each `{instance_dir, instance_prompt | identifier +
class_noun, class_prompt, class_dir, num_class_images, repeats}`, stored in the run's config, so a run resumes
without the file), or the one concept the command line describes. Read and checked here, before anything is
written; their images are concepts.py's.

Folders laid out as kohya's sd-scripts lay them out say what they hold in their names: `10_sks dog` is the photos
of "sks dog", each seen 10 times an epoch (repeats); a class folder `1_dog` holds images of "dog". `folder_named`
reads such a name; `kohya_rules` says what a concept's folder names give where its settings are silent.
"""
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from minidream.options import text
from minidream.training import TrainError, json_rows

KEYS = ("instance_dir", "instance_prompt", "identifier", "class_noun", "class_prompt", "class_dir", "num_class_images",
        "repeats")
KOHYA_FOLDER = re.compile(r"(\d+)_(\S.*)")  # N_text: repeats N, prompt text


def folder_named(folder) -> tuple[int, str] | None:
    """(repeats, prompt) of a folder named as kohya names them (`10_sks dog`), or None."""
    if not folder or not str(folder).strip():
        return None
    for name in dict.fromkeys((Path(str(folder)).name, Path(str(folder)).resolve().name)):  # typed, or `.`/a link
        m = KOHYA_FOLDER.fullmatch(name)
        if m and m[2].strip() and 1 <= int(m[1]) <= MAX_REPEATS:
            return int(m[1]), m[2].strip()
    return None


def folder_repeats(folder) -> int:
    """How often an epoch sees each image of a folder, as its kohya name says (`1_dog`: 1); 1 when not so named."""
    return (folder_named(folder) or (1,))[0]


def split_prompt(prompt: str) -> tuple[str, str | None]:
    """A kohya folder's prompt as (identifier, class noun): "sks dog" -> ("sks", "dog"); one word: (it, None)."""
    ident, _, noun = prompt.partition(" ")
    return ident, noun.strip() or None


def kohya_rules(instance_dir, class_dir, *, identifier: str | None = None, class_noun: str | None = None,
                instance_prompt: str | None = None, class_prompt: str | None = None, repeats: int | None = None,
                default_identifier: str = "sks", train_token: bool = False) -> dict:
    """A concept's identifier, class noun, prompts and repeats: what its settings say, and where they are silent,
    what its folders' names say, as kohya's sd-scripts reads them (`10_sks dog`: 10 repeats, identifier sks, class
    noun dog; a class folder `1_dog`: the class prompt "dog", 1 repeat). The one place these rules live: the command
    line's concept and every --concepts entry are read by it. A kohya-named photo folder gets kohya's prompts
    ("sks dog" / "dog"; with --train-token "<sks> dog"), any other our template's ("a photo of sks dog"). A folder's
    identifier that is not one word a prompt can hold (`10_<sks> dog`) is not taken: the default identifier is.
    `default_identifier`: --identifier's value (its default "sks" when not given)."""
    named_repeats, named = folder_named(instance_dir) or (None, None)
    folder_ident, folder_noun = split_prompt(named) if named else (None, None)
    if folder_ident is not None and word(folder_ident) is not None:  # not a word a prompt can hold as one token
        folder_ident = None
    ident = identifier or folder_ident or default_identifier
    noun = class_noun or folder_noun
    token = f"<{ident}>" if train_token else ident
    class_named = folder_named(class_dir)
    if named:
        instance_prompt = instance_prompt or (f"{token} {noun}" if noun else token)
        class_prompt = class_prompt or (class_named[1] if class_named else noun)
    else:
        instance_prompt = instance_prompt or f"a photo of {token} {noun}"
        class_prompt = class_prompt or f"a photo of {noun}"
    return {"identifier": ident, "class_noun": noun, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
            "repeats": repeats or named_repeats or 1, "class_repeats": folder_repeats(class_dir)}


def concept_noun(c: dict) -> str | None:
    """A --concepts entry's class noun: its own, or its kohya folder's."""
    rules = kohya_rules(c["instance_dir"], None, identifier=c.get("identifier"), class_noun=c.get("class_noun"))
    return rules["class_noun"]


def with_folder_names(cfg):
    """`cfg` (a TrainConfig) with what a kohya-named --instance-dir (and --class-dir) says, where the command line
    did not say it (`kohya_rules`)."""
    if cfg.concepts or folder_named(cfg.instance_dir) is None:
        return cfg
    given = cfg.identifier != next(f.default for f in fields(cfg) if f.name == "identifier")
    rules = kohya_rules(cfg.instance_dir, cfg.class_dir, identifier=cfg.identifier if given else None,
                        class_noun=cfg.class_noun, instance_prompt=cfg.instance_prompt, class_prompt=cfg.class_prompt,
                        repeats=cfg.repeats, default_identifier=cfg.identifier, train_token=cfg.train_token)
    if rules["class_noun"] is None:  # the folder names no class: validate asks for --class-noun
        return replace(cfg, repeats=rules["repeats"], identifier=rules["identifier"])
    return replace(cfg, **{k: rules[k] for k in ("repeats", "identifier", "class_noun", "instance_prompt",
                                                 "class_prompt")})


MAX_CLASS_IMAGES = 100_000  # per concept: more would only exhaust the disk and the time
MAX_REPEATS = 10_000


def concepts_file(path) -> tuple[dict, ...]:
    """The file's entries (checked as the --concepts setting is: `check_concepts`)."""
    return json_rows(path, "--concepts", "concept", check_concepts, objects=True)


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
        named = folder_named(c["instance_dir"])
        if not (_text(c, "instance_prompt") or ("identifier" in c and _text(c, "class_noun")) or named):
            return f"concept {k} needs \"instance_prompt\", or \"identifier\" and \"class_noun\""
        if not (_text(c, "class_prompt") or _text(c, "class_noun") or (named and split_prompt(named[1])[1])):
            return f"concept {k} needs \"class_prompt\" or \"class_noun\""
        r = c.get("repeats", 1)
        if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_REPEATS):
            return f"concept {k}: repeats must be an integer in [1, {MAX_REPEATS}] (got {r!r})"
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
    repeats: int = 1  # each photo's weight in a draw, and how often an epoch sees it
    class_repeats: int = 1  # a class image's weight among its concept's (a kohya class folder `N_dog`)


def concepts(cfg, out: Path) -> list[Concept]:
    """The run's concepts (`cfg`: its TrainConfig): the --concepts entries, or the one the command line describes
    (whose kohya folder names `with_folder_names` has read already)."""
    if not cfg.concepts:
        class_dir = Path(cfg.class_dir) if cfg.class_dir else out / "class_images"
        return [Concept(Path(cfg.instance_dir), cfg.prompts[0], cfg.prompts[1], class_dir, cfg.num_class_images,
                        cfg.identifier, cfg.repeats or 1, folder_repeats(class_dir))]
    rows = []
    for k, c in enumerate(cfg.concepts):
        class_dir = Path(c["class_dir"]) if c.get("class_dir") else out / "class_images" / f"concept-{k}"
        rules = kohya_rules(c["instance_dir"], class_dir, identifier=c.get("identifier"),
                            class_noun=c.get("class_noun"), instance_prompt=c.get("instance_prompt"),
                            class_prompt=c.get("class_prompt"), repeats=c.get("repeats", cfg.repeats),
                            default_identifier=cfg.identifier, train_token=cfg.train_token)
        rows.append(Concept(Path(c["instance_dir"]), rules["instance_prompt"], rules["class_prompt"], class_dir,
                            c.get("num_class_images", cfg.num_class_images), rules["identifier"], rules["repeats"],
                            rules["class_repeats"]))
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
        if cfg.class_images and c.class_dir.resolve() in photos:
            whose = "its" if photos[c.class_dir.resolve()] == k else f"concept {photos[c.class_dir.resolve()]}'s"
            raise TrainError(f"{where(k)}class images folder {c.class_dir} is {whose} instance folder: the photos "
                             f"would serve as class images; choose another --class-dir")
        if cfg.class_images and c.class_dir.resolve() == out.resolve():
            raise TrainError(f"{where(k)}class images folder {c.class_dir} is --out: the run's own images (curves, "
                             f"grids) would be read as class images; choose another --class-dir")
        if cfg.class_images and c.num_class_images < 1:
            raise TrainError(f"{where(k)}num_class_images is 0 with prior preservation: give it at least 1, or "
                             f"pass --no-prior")
        if cfg.class_images and dirs.setdefault(c.class_dir.resolve(), k) != k:
            raise TrainError(f"concepts {dirs[c.class_dir.resolve()]} and {k} share the class folder {c.class_dir}; "
                             f"give each its own class_dir")
    if cfg.train_token and len({c.identifier for c in rows}) > 1:
        raise TrainError(f"--train-token learns one token; the concepts name {len({c.identifier for c in rows})} "
                         f"identifiers ({', '.join(sorted({c.identifier for c in rows}))}): use one")


def absolute_paths(cfg):
    """The run's local paths made absolute, as run.json and the checkpoints store them: the printed `--resume latest`
    command works from any folder. (A hub repo id, which is no local path, stays as it is.)"""
    import os

    def full(p):
        return os.path.abspath(p) if isinstance(p, str) and p.strip() else p
    concepts = tuple({**c, **{k: full(c[k]) for k in ("instance_dir", "class_dir") if k in c}}
                     for c in cfg.concepts if isinstance(c, dict))
    model = full(cfg.model) if cfg.model and Path(cfg.model).expanduser().exists() else cfg.model
    return replace(cfg, instance_dir=full(cfg.instance_dir), class_dir=full(cfg.class_dir), mask_dir=full(cfg.mask_dir),
                   model=model, concepts=concepts if len(concepts) == len(cfg.concepts) else cfg.concepts,
                   text_encoders=tuple(full(p) for p in cfg.text_encoders), vae=full(cfg.vae))
