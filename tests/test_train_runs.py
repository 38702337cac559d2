"""Runs that never lose or corrupt work: --overwrite starts over, resume keeps the run's own settings and
refuses changes it cannot honour, class images are written atomically and fill numbering gaps."""
import json

import torch
from PIL import Image

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)


def steps_logged(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_starts_over(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 4, "--checkpoint-every", 2, "--keep-last", 0))
    assert r.exit_code == 0, r.output
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.old").write_text("")  # an earlier run's TensorBoard log
    (out / "lora_kohya.safetensors").write_text("")  # an earlier run's export in another format
    (out / "notes.txt").write_text("mine")  # the user's own file
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 2, "--checkpoint-every", 1, "--keep-last", 1,
                            "--class-prompt", "a photo of a cat", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert not (out / "tensorboard").exists() and not (out / "lora_kohya.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.safetensors"]
    assert steps_logged(out) == [1, 2]
    # the class images were made again, for the new class prompt
    assert {Image.open(p).text["prompt"] for p in (out / "class_images").glob("*.png")} == {"a photo of a cat"}
    # and --resume latest continues the new run, not the old one
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 3, "--checkpoint-every", 1, "--keep-last", 1,
                            "--resume", "latest"))
    assert r.exit_code == 0 and "at step 2" in r.output, r.output
    assert steps_logged(out) == [1, 2, 3]


def test_bare_resume_keeps_the_runs_mode_and_exports(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--model", sd1_dir, "--instance-dir", instance_dir, "--class-noun", "dog", "--out", out]
    r = run_cli("train", *base, "--train", "lora", "--steps", 2, "--checkpoint-every", 1, "--resolution", 16,
                "--num-class-images", 2, "--class-steps", 2, "--lr", 1e-3)
    assert r.exit_code == 0, r.output
    (out / "lora_kohya.safetensors").unlink()
    r = run_cli("train", *base, "--steps", 3, "--resume", "latest")  # what the Ctrl-C message says to do
    assert r.exit_code == 0, r.output
    assert (out / "lora_kohya.safetensors").exists() and (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "model").exists()
    assert json.loads((out / "run.json").read_text())["mode"] == "lora"


def test_resume_refuses_settings_it_cannot_change(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--steps", 2, "--checkpoint-every", 1))
    assert r.exit_code == 0, r.output
    for extra, named in ((["--train", "unet"], "--train"), (["--lr", 5e-4], "--lr"), (["--seed", 3], "--seed"),
                         (["--resolution", 24], "--resolution")):
        args = [a for a in train_args(sd1_dir, instance_dir, out, "--steps", 4, "--resume", "latest")
                if a not in ("--lr", 1e-3, "--resolution", 16)]
        r = run_cli(*args, *extra)
        assert r.exit_code == 2 and f"{named} cannot change" in r.output and "Traceback" not in r.output, r.output
    assert steps_logged(out) == [1, 2]


def test_class_images_fill_gaps_and_ignore_unfinished_files(sd1_dir, instance_dir, tmp_path):
    cdir = tmp_path / "class"
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "a", "--steps", 1, "--num-class-images", 3,
                            "--class-dir", cdir))
    assert r.exit_code == 0, r.output
    kept = (cdir / "class-00002.png").read_bytes()
    (cdir / "class-00001.png").unlink()
    (cdir / ".class-00003.png.tmp999").write_bytes(b"")  # what a kill mid-write used to leave as a 0-byte PNG
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "b", "--steps", 1, "--num-class-images", 3,
                            "--class-dir", cdir, "--class-batch-size", 1))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in cdir.iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert (cdir / "class-00002.png").read_bytes() == kept  # not overwritten
    assert Image.open(cdir / "class-00001.png").text["index"] == "1"
    # images made for another class prompt are not silently reused
    r = run_cli(*train_args(sd1_dir, instance_dir, tmp_path / "c", "--steps", 1, "--num-class-images", 3,
                            "--class-dir", cdir, "--class-noun", "cat"))
    assert r.exit_code == 2 and "another class prompt" in r.output, r.output


def test_a_failed_start_writes_nothing(sd1_dir, instance_dir, tmp_path):
    """Every setting is checked (the model loaded, the device found) before run.json or anything else is written."""
    import torch
    cases = [(["--lora-rank", 0, "--train", "lora"], "--lora-rank must be at least 1"),
             (["--seed", 2 ** 63], "--seed must be in [0, 2^63)"),
             (["--class-batch-size", 0], "--class-batch-size must be at least 1"),
             (["--validation-images", 0, "--validation-prompt", "a dog"], "--validation-images must be at least 1"),
             (["--device", "banana"], "--device 'banana' is not a device"),
             (["--model", tmp_path / "nowhere"], "no such file or folder")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "no CUDA GPU is available"),
                  (["--attention", "triton", "--device", "cpu"], "--attention triton needs a CUDA GPU")]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        env = {"TRITON_INTERPRET": "0"} if "triton" in extra else {}
        from typer.testing import CliRunner
        from minidream.cli import app
        r = CliRunner().invoke(app, [str(a) for a in train_args(sd1_dir, instance_dir, out, *extra)], env=env)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (needle, r.output)
        assert not out.exists() or not any(out.iterdir()), (needle, list(out.iterdir()))


def test_resolution_must_divide_by_the_models_downsampling():
    """SD 1.x/2.x: VAE ×8 and three UNet downsamplings: 520 px gives an odd latent side deep inside the UNet."""
    import pytest
    from minidream.training import TrainError
    from minidream.training.dreambooth import validate_resolution
    validate_resolution(512, 64)
    for bad in (520, 40):
        with pytest.raises(TrainError, match="multiple of 64 for this model"):
            validate_resolution(bad, 64)


def test_crafted_checkpoints_are_one_line_and_write_nowhere_else(sd1_dir, instance_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 2, "--checkpoint-every", 1, "--keep-last", 0))
    assert r.exit_code == 0, r.output
    ck = out / "checkpoints" / "step-000002.safetensors"
    with safe_open(str(ck), "pt") as f:
        meta = json.loads(f.metadata()["minidream"])
    tensors = load_file(ck)
    elsewhere = tmp_path / "elsewhere"
    crafted = [({"config": {**meta["config"], "steps": "many"}}, "not usable"),
               ({"config": {**meta["config"], "lr_schedule": "zigzag"}}, "--lr-schedule 'zigzag'"),
               ({"step": -3}, "is not a step count"),
               # a setting missing from a checkpoint of this settings version: not an older one, a damaged one
               ({"config": {k: v for k, v in meta["config"].items() if k != "optimizer"}}, "(no optimizer)"),
               ({"config": "nope"}, "not usable"),
               ({"param_groups": [{"lr": "x"}]}, "not usable"),
               ({"config": {**meta["config"], "class_dir": str(elsewhere)}}, "(from the checkpoint) holds 0 of 2")]
    for change, needle in crafted:
        save_file(tensors, ck, metadata={"minidream": json.dumps({**meta, **change})})
        (out / "checkpoints" / ".step-000003.safetensors.tmp77").write_bytes(b"half")  # a killed write's leftover
        args = [a for a in train_args(sd1_dir, instance_dir, out, "--resume", "latest")]
        r = run_cli(*args)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (change, r.output)
        assert not elsewhere.exists()
    save_file(tensors, ck, metadata={"minidream": json.dumps(meta)})
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--resume", "latest"))
    assert r.exit_code == 0, r.output
    assert not list((out / "checkpoints").glob(".*.tmp*"))


def test_progress_into_a_log_writes_lines_not_thousands_of_redraws(capsys):
    from minidream.progress import Progress
    bar = Progress(1000, "training")
    for _ in range(1000):
        bar.update(loss=0.1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 3 and "\r" not in "".join(lines) and "1000/1000" in lines[-1], lines


def test_overwrite_removes_what_every_exporter_writes(tmp_path):
    """What --overwrite removes is derived from the exporters' table: a format's output is removed with the rest."""
    from minidream.formats.exports import EXPORTERS
    from minidream.training.config import TrainConfig
    from minidream.training.run_folder import clear_run
    out = tmp_path / "run"
    for row in EXPORTERS.values():
        (out / row.output).parent.mkdir(parents=True, exist_ok=True)
        (out / row.output).write_text("")
    clear_run(out, TrainConfig(model="m", out=str(out)))
    assert not list(out.iterdir())


def test_checkpoints_of_earlier_versions_resume_the_same(sd1_dir, instance_dir, tmp_path):
    """A checkpoint written before the --train setting was renamed (config key "train") and before --optimizer
    existed, with the flow defaults that versions 2-3 stored in every run, resumes exactly as the same checkpoint in
    today's layout."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out = tmp_path / "run"
    args = ["--train", "lora", "--steps", 2, "--checkpoint-every", 1, "--keep-last", 0, "--save-as", "lora-diffusers",
            "--device", "cpu"]
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args))
    assert r.exit_code == 0, r.output
    (out / "checkpoints" / "step-000002.safetensors").unlink()
    old = tmp_path / "old"
    shutil.copytree(out, old)
    ck = old / "checkpoints" / "step-000001.safetensors"
    with safe_open(str(ck), "pt") as f:
        meta = json.loads(f.metadata()["minidream"])
    config = dict(meta["config"], train=meta["config"].pop("mode"))
    del config["optimizer"], config["text_encoders"], meta["settings_version"]  # as before versions and these
    del config["vae"], config["guidance_scale"]
    config.update(weighting_scheme="logit_normal", precondition_outputs=True)  # the defaults versions 2-3 stored
    save_file(load_file(ck), ck, metadata={"minidream": json.dumps({**meta, "config": config})})
    for folder in (out, old):
        r = run_cli(*train_args(sd1_dir, instance_dir, folder, *args, "--resume", "latest"))
        assert r.exit_code == 0 and "at step 1" in r.output, r.output
    a, b = (load_file(d / "lora" / "pytorch_lora_weights.safetensors") for d in (out, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((old / "run.json").read_text())["mode"] == "lora"


# the settings of version 0 (checkpoints before settings_version): every later one is in resume_settings.ADDED
# (by today's names: original_config was config, which a checkpoint's settings are read from: its `was`)
VERSION_0 = {
    "adam_beta1", "adam_beta2", "adam_epsilon", "allow_pickle", "attention", "batch_size", "cache_latents",
    "center_crop", "checkpoint_every", "class_batch_size", "class_dir", "class_guidance", "class_negative_prompt",
    "class_noun", "class_precision", "class_prompt", "class_steps", "original_config", "device", "flip", "grad_accum",
    "gradient_checkpointing", "identifier", "instance_dir", "instance_prompt", "keep_last", "lora_alpha", "lora_rank",
    "lr", "lr_power", "lr_schedule", "max_grad_norm", "mixed_precision", "mode", "model", "noise_offset",
    "num_class_images", "out", "preset", "prior", "prior_loss_weight", "resolution", "revision", "save_as", "seed",
    "snr_gamma", "steps", "text_encoder_lr", "text_encoder_steps", "tf32", "token_lr", "tokenizer",
    "train_text_encoder", "train_token", "validation_every", "validation_images", "validation_prompts",
    "validation_steps", "variant", "warmup_steps", "weight_decay"}


def test_every_new_setting_says_what_older_checkpoints_ran_with():
    """A setting added to TrainConfig needs its ADDED row (the value older checkpoints ran with), or every older
    checkpoint stops resuming (it lacks the key)."""
    from minidream.training.config import OPTIONS
    from minidream.training.resume_settings import ADDED, SETTINGS_VERSION
    later = [k for v in ADDED.values() for k in v]
    assert set(OPTIONS) == VERSION_0 | set(later) and len(later) == len(set(later)) and max(ADDED) == SETTINGS_VERSION


def test_a_finished_run_extends_from_its_last_step(sd1_dir, instance_dir, tmp_path):
    """A checkpoint is always written at the last step (here 3, with --checkpoint-every 0): `train --out RUN
    --resume latest --steps 5`, nothing else named, trains on from it to the weights of a run that went there at
    once (every setting, the model's too, comes from the checkpoint)."""
    import shutil
    from safetensors.torch import load_file
    args = ["--train", "lora", "--checkpoint-every", 0, "--save-as", "lora-diffusers"]
    at_once, extended = tmp_path / "at-once", tmp_path / "extended"
    assert run_cli(*train_args(sd1_dir, instance_dir, at_once, *args, "--steps", 5)).exit_code == 0
    assert run_cli(*train_args(sd1_dir, instance_dir, extended, *args)).exit_code == 0
    assert [p.name for p in (extended / "checkpoints").iterdir()] == ["step-000003.safetensors"]
    r = run_cli("train", "--out", extended, "--resume", "latest", "--steps", 5)
    assert r.exit_code == 0 and "at step 3" in r.output, r.output
    a, b = (load_file(d / "lora" / "pytorch_lora_weights.safetensors") for d in (at_once, extended))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(extended) == [1, 2, 3, 4, 5]
    shutil.rmtree(at_once)


def test_a_concepts_run_resumes_without_its_file(sd1_dir, instance_dir, tmp_path):
    """The concepts are in the checkpoint: the file moved (or edited), --resume latest without --concepts goes on."""
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"instance_dir": str(instance_dir), "identifier": "sks", "class_noun": "dog"}]))
    out = tmp_path / "run"
    base = ["train", "--model", sd1_dir, "--out", out, "--resolution", 16, "--num-class-images", 1,
            "--class-steps", 1, "--checkpoint-every", 1]
    assert run_cli(*base, "--concepts", concepts, "--steps", 1).exit_code == 0
    concepts.rename(tmp_path / "moved.json")
    r = run_cli(*base, "--steps", 2, "--resume", "latest")
    assert r.exit_code == 0 and "at step 1" in r.output, r.output
    assert steps_logged(out) == [1, 2]


def test_only_a_runs_own_unfinished_files_are_removed(tmp_path):
    """A killed write's leftovers go; the user's own dot-files in --out stay; an export swapped out whose new one
    never arrived is put back."""
    from minidream.training.run_folder import remove_unfinished
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    mine = [out / ".tmp", out / "x.tmpl", out / ".notes.tmpl", out / "src" / ".cache.tmp1"]
    for f in mine:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("the user's")
    stale = [out / "checkpoints" / ".step-000002.safetensors.tmp123", out / ".model.tmp77", out / ".tmpa1b2c3d4"]
    for f in stale:
        f.write_text("half")
    (out / ".lora.tmp55old").mkdir()
    (out / ".lora.tmp55old" / "pytorch_lora_weights.safetensors").write_text("the previous export")
    remove_unfinished(out)
    assert all(f.read_text() == "the user's" for f in mine) and not any(f.exists() for f in stale)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_text() == "the previous export"


def test_a_bare_resume_keeps_the_runs_precision(sd1_dir, instance_dir, tmp_path):
    """--resume latest without --mixed-precision continues a bf16 run in bf16 (the run's own setting, not the
    command line's default): the weights are those of the run that went on without stopping."""
    import shutil
    from safetensors.torch import load_file
    args = ["--train", "lora", "--checkpoint-every", 1, "--keep-last", 0]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*train_args(sd1_dir, instance_dir, straight, *args, "--mixed-precision", "bf16")).exit_code == 0
    shutil.copytree(straight, resumed)
    for step in (2, 3):
        (resumed / "checkpoints" / f"step-{step:06d}.safetensors").unlink()
    r = run_cli(*train_args(sd1_dir, instance_dir, resumed, *args, "--resume", "latest"))
    assert r.exit_code == 0 and "at step 1" in r.output, r.output
    a, b = (load_file(d / "checkpoints" / "step-000003.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_cannot_ask_for_an_export_its_mode_cannot_make(sd1_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 1, "--checkpoint-every", 1)).exit_code == 0
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--steps", 2, "--save-as", "lora-kohya", "--resume", "latest"))
    assert r.exit_code == 2 and "--save-as lora-* needs --train lora" in r.output, r.output
    assert steps_logged(out) == [1]
