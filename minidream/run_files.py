"""Run files: a command's options in a TOML file (`--config run.toml`), so that a run can be shared and versioned.

A key is an option's name without its dashes (`lora_rank` or `lora-rank`; a switch's second name sets it off:
`no_prior = true`), or its setting's name as run.json stores it (`mode`): so a run's run.json is a run file too.
The command line overrides the file. `--print-config` prints the resolved options as such a file (every one of
them, whatever their defaults become later) and runs nothing. The file's values go through the same declarations
and checks as the command line's (minidream/options.py); a key no option has is one line that names the nearest.
"""
import difflib
import json
import math
from dataclasses import Field, asdict, dataclass, fields
from pathlib import Path
from typing import get_args

from minidream.options import option, option_flag, repeatable_field, typed_path


@dataclass(frozen=True)
class RunFile:
    """The options that read and write run files (`train`, `sample`)."""
    config: str | None = option(None, "A run file (TOML; or a run's run.json) of this command's options, keys as the "
                                "options without dashes; the command line overrides it. (A folder or repo id here "
                                "is read as --original-config, its name before.)")
    print_config: bool = option(False, "Print the resolved options as a TOML run file, and run nothing.")


class RunFileError(Exception):
    """A run file that cannot be read, worded for the user (one line)."""


def is_run_file(value: str | None) -> bool:
    """--config names a run file (.toml, or a run's .json); else it is the architecture of a single file, as it
    was before --original-config."""
    return value is not None and Path(value).suffix.lower() in (".toml", ".json")


def names(classes) -> dict[str, Field | tuple[Field, bool]]:
    """Every key a run file may use, normalized (dashes as underscores): the field's name and its option's names;
    a switch's second name maps to (field, False)."""
    out = {}
    for cls in classes:
        for f in fields(cls):
            if f.name in ("config", "print_config"):
                continue
            flags = (f.metadata["flag"] or "--" + f.name).split("/")
            if len(flags) == 1 and f.type is bool:  # a switch: typer's --name/--no-name
                flags.append("--no-" + flags[0].removeprefix("--"))
            out[f.name] = out[_key(flags[0])] = f
            if f.metadata["was"]:  # its name in a run.json written before it was renamed
                out.setdefault(f.metadata["was"], f)
            if len(flags) == 2:
                out[_key(flags[1])] = (f, False)
    return out


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def read(path: str) -> dict:
    """The file's table: TOML, or a run's run.json (its `processes`, a fact of the run, left out)."""
    file = Path(path)
    if not file.is_file():
        what = "a folder" if file.is_dir() else "not a regular file" if file.exists() else "no such file"
        raise RunFileError(f"--config {file}: {what}; give a run file (TOML)")
    try:
        text = file.read_text(encoding="utf-8").removeprefix("\ufeff")  # (an editor's byte-order mark)
        if file.suffix.lower() == ".json":
            table = json.loads(text, object_pairs_hook=_unique)
            if not isinstance(table, dict):
                raise ValueError("not an object of settings")
            table.pop("processes", None)
            return table
        import tomllib  # (Python 3.11)
        table = tomllib.loads(text)
        if isinstance(table.get("config"), str) and is_run_file(table["config"]):  # (a run.json's "config": the
            # old --original-config, a folder)
            raise RunFileError(f"--config {file}: config = {table['config']!r}: a run file cannot name another; "
                               f"put its settings in this one")
        return table
    except ImportError:
        raise RunFileError("--config: reading TOML needs Python 3.11 or later (tomllib)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise RunFileError(f"--config {file}: not a readable run file ({why})") from None


def _unique(pairs: list) -> dict:
    """A JSON object whose keys are each given once (as TOML's must be)."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"the key {twice!r} is given twice")
    return dict(pairs)


def _kind(f: Field) -> type:
    """The type an option's value has on the command line (a path's: text)."""
    kinds = [a for a in getattr(f.type, "__args__", (f.type,)) if a is not type(None)]
    return f.metadata["cli_type"] or kinds[0]


def _fits(f: Field, v) -> bool:
    """Whether a file's value has the type the option takes (a path option's: text; a list option's: a list of its
    items' type; a file's rows (--concepts, --validation-file): a path or the rows; a run.json's null: an option
    left out)."""
    if v is None:
        return f.default is None
    if repeatable_field(f):
        return isinstance(v, list) and all(_is(get_args(f.type)[0], x) for x in v)
    if f.metadata["parse"] is not None and f.type is tuple:
        return isinstance(v, (str, list))
    return _is(_kind(f), v)


def _is(kind: type, v) -> bool:
    """Whether a value from a file is of a command-line type (a path's: text)."""
    if kind is bool:
        return isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        try:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        except OverflowError:  # an integer too long for a float
            return False
    return isinstance(v, str)


def file_options(path: str, classes) -> dict:
    """The command's options a run file sets, by field name, in the command line's form."""
    known, out = names(classes), {}
    for key, value in read(path).items():
        entry = known.get(_key(str(key)))
        if entry is None:
            near = difflib.get_close_matches(_key(str(key)), [k for k in known if "_" in k or k.isalpha()], n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise RunFileError(f"--config {path}: {key!r} is not an option of this command{hint}")
        f, on = entry if isinstance(entry, tuple) else (entry, True)
        if not _fits(f, value) or (not on and not isinstance(value, bool)):
            raise RunFileError(f"--config {path}: {key} = {value!r} is not what {option_flag(f)} takes")
        if f.name in out:
            raise RunFileError(f"--config {path}: {key} sets {option_flag(f)}, which another key sets too")
        if f.metadata["cli_type"] is not None and isinstance(value, str):  # a path, as the command line types it
            value = typed_path(value)
        out[f.name] = float(value) if _kind(f) is float and value is not None else value if on else not value
    return out


def merged(options: dict, given: set[str], path: str, classes) -> tuple[dict, set[str]]:
    """The command line's options with the run file's where the command line does not name them; and the names
    of the options the user gave, in either."""
    from_file = {k: v for k, v in file_options(path, classes).items() if k not in given}
    if from_file.get("epochs") is not None:  # (a run.json of a run by epochs: its steps are what they came to)
        from_file.pop("steps", None)
    named = {k for k, v in from_file.items() if v is not None}  # (a run.json's null: left to its default)
    return {**options, **from_file}, given | named


# ---------------------------------------------------------------------------------------------
# Writing one

def to_toml(*objects) -> str:
    """The settings of `objects` (dataclasses of declared options) as a run file, each under its option's name; an
    option left to its default of none is a comment (TOML has no none)."""
    lines = []
    for obj in objects:  # the command's own options first, then those --help shows in panels of their own
        for f in sorted(fields(obj), key=lambda f: f.metadata["panel"] is not None):
            if f.name in ("config", "print_config"):
                continue
            key, value = _key(option_flag(f)), getattr(obj, f.name)
            lines.append(f"# {key}: not given (its default)" if value is None else f"{key} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    if hasattr(v, "__dataclass_fields__"):
        return _value(asdict(v))
    # a TOML basic string: JSON's escapes are TOML's (DEL, which JSON leaves, TOML refuses raw)
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")
