"""The docs tell the truth about the code: the training guide lists every option of `minidream train`, no option
that is gone, and each default as the code declares it; every relative link of the README and docs/ reaches a file."""
import enum
import re
from pathlib import Path

import typer.main

from minidream.cli import app

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "training.md"


def train_options() -> dict:
    """`minidream train`'s options as click sees them: {"--a/--no-a": parameter}."""
    command = typer.main.get_command(app).commands["train"]
    return {"/".join(p.opts + p.secondary_opts): p for p in command.params}


def shown_default(p) -> str:
    """A default as the guide's table writes it: a switch's name, on/off, the value in backticks, or — for none."""
    d = p.default
    if getattr(p, "is_flag", False) and d is not None:
        return f"`{(p.opts if d else p.secondary_opts)[0]}`" if p.secondary_opts else ("on" if d else "off")
    if d is None or d == () or d == "":
        return "—"
    return f"`{d.value if isinstance(d, enum.Enum) else d}`"


def guide_rows(guide: Path = GUIDE) -> dict:
    """The reference tables under "## Every option": {"--a/--no-a": the default column}."""
    reference = guide.read_text().split("## Every option", 1)[1]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\| `(--[^`]+)` \|([^|]*)\|", reference, re.M)}


def test_the_training_guide_lists_every_option_with_its_default():
    code, guide = train_options(), guide_rows()
    assert not set(code) - set(guide), f"options missing from docs/training.md: {sorted(set(code) - set(guide))}"
    assert not set(guide) - set(code), f"docs/training.md lists options train lacks: {sorted(set(guide) - set(code))}"
    wrong = {flag: (guide[flag], shown_default(p)) for flag, p in code.items() if guide[flag] != shown_default(p)}
    assert not wrong, f"docs/training.md's defaults (written, declared): {wrong}"


def test_the_guide_check_can_fail(tmp_path):
    """What the check above reads sees a row taken out, a row made up and a default changed."""
    text = GUIDE.read_text()
    edited = tmp_path / "training.md"
    edited.write_text(re.sub(r"^\| `--lora-rank` \|.*\n", "", text, flags=re.M) + "| `--no-such-option` | — | x |\n")
    rows = guide_rows(edited)
    assert "--lora-rank" not in rows and "--lora-rank" in train_options() and "--no-such-option" in rows
    edited.write_text(text.replace("| `--steps` | `400` |", "| `--steps` | `500` |"))
    assert guide_rows(edited)["--steps"] != shown_default(train_options()["--steps"])


def test_every_relative_link_reaches_a_file():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
