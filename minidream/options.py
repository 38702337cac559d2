"""An option declared once: a dataclass field that carries, beside its default, the help of its command-line option,
its check and its choices (the keys of the table that implements them). TrainConfig (training/config.py) and
SamplingParams (sampling/pipeline.py) are made of these; `training.config.validate` runs the checks, and
`with_options` gives a command (cli.py) the fields as its options, typed, named and explained by the declarations.
"""
import inspect
import math
import types
from dataclasses import MISSING, Field, dataclass, field, fields
from enum import Enum
from typing import Annotated, Callable, Optional, Union, get_args, get_origin, get_type_hints


# ---------------------------------------------------------------------------------------------
# Checks: each says what is wrong with a value (the option's flag goes before it), or None when nothing is

def one_of(values, optional: bool = False):
    """The check of a choice: what is wrong with a value not among `values` (None, when optional, is allowed)."""
    return lambda v: None if v in values or (optional and v is None) else f"{v!r} is not one of {', '.join(values)}"


def each_one_of(values):
    return lambda vs: next((f"{v!r} is not one of {', '.join(values)}" for v in vs if v not in values), None)


def at_least(n: int, most: int | None = None):
    """A count: at least n (and at most `most`, where more would only exhaust memory or time)."""
    def check(v):
        if not v >= n:
            return f"must be at least {n} (got {v})"
        return None if most is None or v <= most else f"must be at most {most} (got {v})"
    return check


def non_negative(v):
    return None if 0 <= v < math.inf else f"must be >= 0 and finite (got {v})"


def positive(v):
    return None if 0 < v < math.inf else f"must be > 0 and finite (got {v})"


def positive_number(v):  # None stands for a default
    return None if v is None or 0 < v < math.inf else f"must be a positive number (got {v})"


def in_range(lo: float, hi: float):
    return lambda v: None if lo <= v <= hi else f"must be in [{lo:g}, {hi:g}] (got {v})"


def probability(v):
    return None if 0 <= v <= 1 else f"is a probability in [0, 1] (got {v})"


def text(v):
    """Text that goes to the tokenizer: UTF-8 (a shell passes other bytes as lone surrogates)."""
    if v is None or isinstance(v, str) and not _undecodable(v):
        return None
    return "is not UTF-8 text; write it in UTF-8"


def texts(vs):
    return next((text(v) for v in vs if text(v)), None)


def _undecodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def optional_at_least(n: int, most: int | None = None):
    """A count that may be left out (None: the command's own default)."""
    return optional(at_least(n, most))


def beta(v):
    return None if 0 <= v < 1 else f"must be in [0, 1) (got {v})"


def extension(v):
    return None if v is None or (v.strip(".") and "/" not in v) else f"{v!r}: give a file extension such as .txt"


def decay(v):
    return None if -1 <= v <= 0 else f"must be in [-1, 0] (got {v})"


def optional_count(v):
    return None if v is None else at_least(1, 10 ** 6)(v)


def optional(check):
    """A check that also lets None (the command's own default) through."""
    return lambda v: None if v is None else check(v)


def finite(v):
    return None if math.isfinite(v) else f"must be a finite number (got {v})"


def seed_range(v):
    """A seed: what torch's generators take."""
    return None if 0 <= v < 2 ** 63 else f"must be in [0, 2^63) (got {v})"


def comma_integers(each):
    """Comma-separated integers ("0,1,2"), each passing `each`."""
    def check(v):
        parts = v.split(",")
        if not all(p.strip().isdecimal() and p.strip().isascii() for p in parts):
            return f"{v!r}: give comma-separated integers, e.g. 0,1,2"
        return next(filter(None, (each(int(p)) for p in parts)), None)
    return check


def device_name(v):
    if v is None or v.strip():
        return None
    return "is empty; give cuda, cuda:N or cpu (or leave it out: cuda when available)"


def out_folder(v):
    """A folder a command writes into (made if missing): not empty, not a file, not below a file."""
    from pathlib import Path
    if not str(v).strip():  # "" would mean the current folder
        return "is empty; name a folder"
    out = Path(v)
    if out.exists() and not out.is_dir():
        return f"{out} is a file; give a folder"
    if not next(p for p in (out, *out.parents) if p.exists()).is_dir():
        return f"{out}: cannot create it (it is below a file); choose another folder"
    return None


def path(v):
    """A file or folder the user names: not empty (an empty path would mean the current folder)."""
    return None if v is None or str(v).strip() else "is empty; name a file or folder"


def paths(vs):
    return next((path(v) for v in vs if path(v)), None)


def typed_path(s: str):
    """A path as typed: "" stays "" for the checks to refuse (as a Path it would be ".", the current folder)."""
    from pathlib import Path
    return s if not str(s).strip() else Path(s)


def path_option(*flags, **kwargs):
    """A command-line option (typer's) that takes a path, "" kept as typed."""
    import typer
    return typer.Option(*flags, parser=typed_path, metavar="<path>", **kwargs)


def first_problem(obj) -> tuple[str, str] | None:
    """(field, what is wrong) for the first declared field of `obj` whose check fails, or None."""
    for f in fields(obj):
        check = f.metadata.get("check")
        wrong = check and check(getattr(obj, f.name))
        if wrong:
            return f.name, wrong
    return None


def option_flag(f: Field) -> str:
    """The option's name on the command line (the first of a switch's pair)."""
    return (f.metadata["flag"] or "--" + f.name.replace("_", "-")).split("/")[0]


# ---------------------------------------------------------------------------------------------
# The declaration


@dataclass(frozen=True)
class Needs:
    """What an option asks of the others when it is given (set to other than its default): `holds(settings)`, else
    the run is refused with `why` (formatted with {flag}, the option's, and {cfg}, the settings)."""
    holds: Callable
    why: str


def option(default=MISSING, help: str = "", *, check=None, choices=None, resumable: bool = False, flag: str = None,
           cli_type=None, parse=None, was: str = None, needs: tuple[Needs, ...] = (), panel: str | None = None):
    """A dataclass field with everything about its option:
    check      a function that says what is wrong with a value (None: nothing); `choices` (a table's keys) makes one
    resumable  a resumed run may take a new value for it; any other, given with a different value, is refused
    flag       the option's name(s) on the command line, when not --field-name (typer's "--on/--off" for a switch)
    cli_type   the command line's type when it differs (Path), `parse` turning it into the field's value
    was        the field's name in checkpoints written before it was renamed
    needs      what it asks of the other settings when given (`Needs`; training.config.combinations checks them)
    panel      the heading --help shows it under (None: the command's options)"""
    if choices is not None and check is None:
        check = one_of(tuple(choices), optional=default is None)
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None,
            "resumable": resumable, "flag": flag, "cli_type": cli_type, "parse": parse, "was": was,
            "needs": needs, "panel": panel}
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# The command line's form of a declared option (typer)

def choice(name: str, values) -> type[Enum]:
    """A typer choice built from a table's keys (the one place each list is written)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


def _base_type(t):
    """`int | None` -> int; `tuple[str, ...]` -> tuple: the type the field holds."""
    if get_origin(t) in (Union, types.UnionType):
        return next(a for a in get_args(t) if a is not type(None))
    return get_origin(t) or t


def repeatable_field(f: Field) -> bool:
    """A `tuple[X, ...]` field is a repeatable option (unless the command line takes it as one path)."""
    return get_origin(f.type) is tuple and get_args(f.type)[-1] is Ellipsis and f.metadata["cli_type"] is None


def declared_option(f: Field, default=MISSING) -> inspect.Parameter:
    """The command-line parameter of a declared field: its type (a choice from its table, a path, a repeatable list),
    flag, help and default, all read from the declaration; `default` overrides its own."""
    import typer
    meta = f.metadata
    repeatable = repeatable_field(f)
    t = get_args(f.type)[0] if repeatable else _base_type(f.type)
    if meta["choices"] is not None:
        t = choice(f.name.title().replace("_", ""), meta["choices"])
    default = f.default if default is MISSING else default
    default = inspect.Parameter.empty if default is MISSING else default
    if meta["cli_type"] is not None:  # a path on the command line
        t, default = meta["cli_type"], None if default in ((), None) else default
    elif repeatable:
        t, default = list[t], list(default) if default else None
    elif default is not None and meta["choices"] is not None:
        default = t(default)
    if default is None:
        t = Optional[t]
    flags = [meta["flag"]] if meta["flag"] else []
    declare = path_option if meta["cli_type"] is not None else typer.Option
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[t, declare(*flags, help=meta["help"],
                                                             rich_help_panel=meta.get("panel"))])


def declared_values(cls, values: dict):
    """An instance of `cls` from the command line's values of its fields (`values` may hold other options too)."""
    out = {}
    for f in fields(cls):
        v, meta = values[f.name], f.metadata
        if repeatable_field(f):
            v = tuple(x.value if isinstance(x, Enum) else x for x in v or ())
        elif isinstance(v, Enum):
            v = v.value
        out[f.name] = meta["parse"](v) if meta["parse"] else v
    return cls(**out)


def with_options(*classes, **defaults):
    """A command's parameters: its own required ones, the fields of `classes` as options (which it takes as
    **kwargs), then its own with defaults. `defaults` overrides a field's own default for this command."""
    def wrap(fn):
        hints = get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        first = [p for p in own if p.default is inspect.Parameter.empty]
        last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not inspect.Parameter.empty]
        declared = [declared_option(f, defaults.get(f.name, MISSING)) for cls in classes for f in fields(cls)]
        params = first + declared + last
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn
    return wrap
