"""Run files (minidream/run_files.py): `--config run.toml` is the command line in a file; the command line
overrides it; `--print-config` prints what reproduces a run; a run's run.json is a run file too; a bad file is one
line; the old `--config FOLDER` (a single file's architecture) still works, as --original-config."""
import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def toml_of(args: list) -> str:
    """A run file holding the options of a command line (`--flag value` pairs and switches)."""
    lines, i = [], 0
    while i < len(args):
        key = str(args[i]).lstrip("-")
        if i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
            lines.append(f"{key} = {json.dumps(args[i + 1]) if isinstance(args[i + 1], str) else args[i + 1]}")
            i += 2
        else:
            lines.append(f"{key} = true")
            i += 1
    return "\n".join(lines) + "\n"


def test_a_run_file_trains_as_the_same_command_line(sd1_dir, instance_dir, tmp_path):
    args = train_args(str(sd1_dir), str(instance_dir), str(tmp_path / "cli"), "--train", "lora", "--lora-rank", 2,
                      "--loss-type", "huber", "--validation-prompt", "a sks dog")[1:]
    r = run_cli("train", *args)
    assert r.exit_code == 0, r.output
    file = tmp_path / "run.toml"
    text = toml_of(args).replace(str(tmp_path / "cli"), str(tmp_path / "file"))
    file.write_text(text.replace('validation-prompt = "a sks dog"', 'validation_prompt = ["a sks dog"]'))
    r = run_cli("train", "--config", file)
    assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("cli", "file"))
    assert {**a, "out": None} == {**b, "out": None}
    la = load_file(tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors")
    lb = load_file(tmp_path / "file" / "lora" / "pytorch_lora_weights.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_the_command_line_overrides_the_file_and_print_config_reproduces_it(sd1_dir, instance_dir, tmp_path):
    file = tmp_path / "run.toml"
    file.write_text(f'model = "{sd1_dir}"\ninstance-dir = "{instance_dir}"\nclass_noun = "dog"\nlora_rank = 8\n'
                    f'train = "lora"\nno_prior = true\nsteps = 9\nout = "{tmp_path / "out"}"\n')
    r = run_cli("train", "--config", file, "--steps", 3, "--print-config")
    assert r.exit_code == 0, r.output
    printed = tomllib.loads(r.output)
    assert printed["steps"] == 3 and printed["lora_rank"] == 8 and printed["prior"] is False
    assert printed["train"] == "lora" and not (tmp_path / "out").exists()  # it trains nothing
    again = tmp_path / "again.toml"
    again.write_text(r.output)
    assert run_cli("train", "--config", again, "--print-config").output == r.output


def test_run_json_converts_to_a_run_file_that_reproduces_the_run(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--validation-prompt", "a dog",
                            "--zero-terminal-snr"))
    assert r.exit_code == 0, r.output
    printed = run_cli("train", "--config", out / "run.json", "--print-config")
    assert printed.exit_code == 0, printed.output
    file = tmp_path / "run.toml"
    file.write_text(printed.output)
    again = run_cli("train", "--config", file, "--print-config")
    assert again.output == printed.output
    r = run_cli("train", "--config", file, "--out", tmp_path / "again")  # the same run, in another folder
    assert r.exit_code == 0, r.output
    a, b = (json.loads((d / "run.json").read_text()) for d in (out, tmp_path / "again"))
    assert {**a, "out": None} == {**b, "out": None}


@pytest.mark.parametrize("text,needle", [
    ("lora_rnk = 4\n", "'lora_rnk' is not an option of this command; did you mean lora_rank?"),
    ('lora_rank = "four"\n', "lora_rank = 'four' is not what --lora-rank takes"),
    ("lora_rank = \n", "not a readable run file"),
    ("prior = true\nno_prior = true\n", "which another key sets too"),
    ('scheduler = "ddim"\n', "'scheduler' is not an option of this command"),
    ('train = "nope"\n', "--train 'nope' is not one of"),
    ("lr = " + "9" * 400 + "\n", "lr = 9"),  # an integer too long for a float
    ("lr = " + "[" * 3000 + "]" * 3000 + "\n", "not a readable run file"),
    ('validation_prompt = ["a", 1]\n', "is not what --validation-prompt takes"),
    ('out = ["a"]\n', "is not what --out takes"),
    ("no_tf32 = 3\n", "is not what --tf32 takes"),
    ('config = "other.toml"\n', "a run file cannot name another"),
])
def test_a_bad_run_file_is_one_line(sd1_dir, instance_dir, tmp_path, text, needle):
    file = tmp_path / "run.toml"
    file.write_text(text)
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "out", "--config", file))
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_missing_run_file_and_a_missing_out_are_one_line(tmp_path):
    r = run_cli("train", "--config", tmp_path / "none.toml", "--out", tmp_path / "o")
    assert r.exit_code != 0 and "no such file" in r.output
    r = run_cli("train", "--model", "m")
    assert r.exit_code != 0 and "--out is needed" in r.output


def test_sample_takes_a_run_file(sd1_dir, tmp_path):
    from PIL import Image
    file = tmp_path / "sample.toml"
    file.write_text(f'model = "{sd1_dir}"\nprompt = "a red star"\nout = "{tmp_path / "a"}"\nsteps = 2\n'
                    f'height = 32\nwidth = 32\nscheduler = "euler"\nguidance_rescale = 0.5\n')
    r = run_cli("sample", "--config", file, "--seed", 4)
    assert r.exit_code == 0, r.output
    r2 = run_cli("sample", sd1_dir and "--model", sd1_dir, "--prompt", "a red star", "--out", tmp_path / "b",
                 "--steps", 2, "--height", 32, "--width", 32, "--scheduler", "euler", "--guidance-rescale", 0.5,
                 "--seed", 4)
    assert r2.exit_code == 0, r2.output
    a, b = (Image.open(next((tmp_path / d).glob("*.png"))) for d in "ab")
    assert list(a.getdata()) == list(b.getdata()) and a.text["guidance_rescale"] == "0.5"
    printed = tomllib.loads(run_cli("sample", "--config", file, "--print-config").output)
    assert printed["scheduler"] == "euler" and printed["prompt"] == "a red star"


def test_the_old_config_spelling_still_names_the_architecture(sd1_dir, instance_dir, tmp_path):
    """--config FOLDER, a single file's architecture before it was --original-config: read as that, with a note."""
    from minidream.formats import loading
    from minidream.formats.single_file import save_single_file
    f = tmp_path / "m.safetensors"
    save_single_file(loading.load(str(sd1_dir)), f)
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:  # without our architecture metadata: it needs its config
        plain = {k: h.get_tensor(k) for k in h.keys()}
    from safetensors.torch import save_file
    save_file(plain, f)
    r = run_cli("info", f, "--config", sd1_dir)
    assert r.exit_code == 0 and "read as --original-config" in r.output, r.output


def test_a_run_json_from_before_the_rename_reads_its_config_key():
    """run.json of a run made before --config became --original-config stores "config": read as that."""
    from minidream.run_files import names
    from minidream.training.config import TrainConfig
    assert names((TrainConfig,))["config"].name == "original_config"


def test_run_file_edges(sd1_dir, instance_dir, tmp_path):
    """A run.json's nulls are options left to their defaults; --no-X keys of every switch; a JSON key given twice,
    an empty --config and --print-config of a value no run takes are each one line; DEL survives the round trip."""
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--steps", 2))
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--config", out / "run.json", "--out", tmp_path / "again")  # ("epochs": null)
    assert r.exit_code == 0, r.output
    file = tmp_path / "run.toml"
    file.write_text("no_tf32 = true\nno_zero_terminal_snr = true\n")
    printed = tomllib.loads(run_cli("train", "--config", file, "--out", tmp_path / "o", "--print-config").output)
    assert printed["tf32"] is False and printed["zero_terminal_snr"] is False
    twice = tmp_path / "twice.json"
    twice.write_text('{"lr": 0.001, "lr": 0.002}')
    r = run_cli("train", "--config", twice, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "the key 'lr' is given twice" in r.output
    r = run_cli("train", "--config", "", "--out", tmp_path / "o")
    assert r.exit_code != 0 and "--config is empty" in r.output
    r = run_cli("train", "--out", tmp_path / "o", "--lr", "inf", "--print-config")
    assert r.exit_code != 0 and "--lr" in r.output and "Traceback" not in r.output
    r = run_cli("train", "--out", tmp_path / "o", "--class-negative-prompt", "a\x7fb", "--print-config")
    back = tmp_path / "back.toml"
    back.write_text(r.output)
    assert tomllib.loads(back.read_text())["class_negative_prompt"] == "a\x7fb"


def test_config_that_is_not_a_run_file_is_named(sd1_dir, instance_dir, tmp_path):
    """A --config that is a file but not a run file (an image, a FIFO) is named as such, not read as the old
    --original-config (which is a folder or a repo id)."""
    import os
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG")
    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)
    for file, needle in ((png, "not a run file"), (fifo, "not a regular file")):
        r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "out", "--config", file))
        assert r.exit_code == 2 and needle in r.output and "--original-config" not in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_print_config_of_a_resumed_run_is_the_run_s(sd1_dir, instance_dir, tmp_path):
    """--print-config --resume prints the settings the resumed run would have (the checkpoint's with what may change),
    refuses what the resume would refuse, and what it prints resumes the run."""
    out = tmp_path / "run"
    assert run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--lora-rank", 2)).exit_code == 0
    r = run_cli("train", "--out", out, "--resume", "latest", "--print-config", "--steps", 5)
    assert r.exit_code == 0, r.output
    printed = tomllib.loads(r.stdout)
    assert (printed["train"], printed["lora_rank"], printed["steps"], printed["num_class_images"]) == ("lora", 2, 5, 2)
    r = run_cli("train", "--out", out, "--resume", "latest", "--print-config", "--lora-rank", 8)
    assert r.exit_code == 2 and "--lora-rank cannot change in a resumed run" in r.output, r.output
    file = tmp_path / "resumed.toml"
    r = run_cli("train", "--out", out, "--resume", "latest", "--print-config", "--steps", 5)
    file.write_text(r.stdout)
    r = run_cli("train", "--config", file, "--resume", "latest")
    assert r.exit_code == 0 and "at step 3" in r.output, r.output
