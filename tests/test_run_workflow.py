"""A run as people drive it: snapshots to pick the best step from (--save-every), kohya folders (repeats, epochs),
masked loss (--mask-dir, --alpha-mask)."""
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401  (instance_dir is a fixture)

LORA = "lora/pytorch_lora_weights.safetensors"


def same_file(a, b):
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_snapshots_are_the_exports_of_their_step(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """Every 2 steps of 7 a snapshot, the 2 newest kept; the snapshot of step 4 is bit-identical to the export of a
    run that stopped at 4; the final export stays in OUT; diffusers loads a snapshot; a resumed run writes the
    snapshots it had not reached, and --overwrite removes them."""
    from diffusers import StableDiffusionPipeline
    args = ["--train", "lora", "--save-as", "lora-diffusers", "--no-prior"]
    out, four = tmp_path / "run", tmp_path / "four"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 7, "--save-every", 2,
                            "--keep-snapshots", 2))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000004", "step-000006"]
    assert "snapshot of step 6" in r.output and (out / LORA).is_file()
    assert run_cli(*train_args(sd1_dir, instance_dir, four, *args, "--steps", 4)).exit_code == 0
    assert same_file(out / "snapshots" / "step-000004" / LORA, four / LORA)
    assert not same_file(out / "snapshots" / "step-000006" / LORA, four / LORA)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out / "snapshots" / "step-000006" / LORA))
    # extended from the last step, the run goes on snapshotting
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 9)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000006", "step-000008"]
    r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 1, "--overwrite"))
    assert r.exit_code == 0 and not (out / "snapshots").exists(), r.output


def kohya_folder(photos, parent, name):
    import shutil
    folder = parent / name
    shutil.copytree(photos, folder)
    return folder


def base_args(model, out, *extra):
    return ["train", "--model", model, "--out", out, "--resolution", 16, "--num-class-images", 2, "--class-steps", 2,
            "--checkpoint-every", 0, "--lr", 1e-3, *extra]


def test_a_kohya_folder_gives_repeats_prompt_and_epochs(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """`3_sks dog/` is 4 photos x 3 repeats of "sks dog", the class prompt "dog" (kohya's own prompts); --epochs 2
    at batch 4 is 2 x 12 / 4 = 6 steps; data.json records all of it; --steps and --epochs together are refused."""
    import json
    photos = kohya_folder(instance_dir, tmp_path, "3_sks dog")
    out = tmp_path / "run"
    r = run_cli(*base_args(sd1_dir, out, "--instance-dir", photos, "--epochs", 2, "--batch-size", 4))
    assert r.exit_code == 0 and "--epochs 2: 6 steps" in r.output, r.output
    data = json.loads((out / "data.json").read_text())
    assert (data["steps"], data["epochs"], data["epoch_images"]) == (6, 2, 12)
    inst = [x for x in data["images"] if x["kind"] == "instance"]
    klass = [x for x in data["images"] if x["kind"] == "class"]
    assert {(x["prompt"], x["repeats"]) for x in inst} == {("sks dog", 3)} and len(inst) == 4
    assert {x["prompt"] for x in klass} == {"dog"}
    run = json.loads((out / "run.json").read_text())
    assert (run["identifier"], run["class_noun"], run["repeats"], run["steps"]) == ("sks", "dog", 3, 6)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6
    r = run_cli(*base_args(sd1_dir, tmp_path / "both", "--instance-dir", photos, "--epochs", 2, "--steps", 5))
    assert r.exit_code == 2 and "not both" in r.output and not (tmp_path / "both").exists(), r.output
    for name in ("0_sks dog", "1_ sks dog"):  # not kohya names (0 repeats; no prompt): the class noun is what lacks
        bad = kohya_folder(instance_dir, tmp_path / name[:3], name)
        r = run_cli(*base_args(sd1_dir, tmp_path / "bad", "--instance-dir", bad, "--steps", 1))
        assert r.exit_code == 2 and "--class-noun is needed" in r.output and repr(name) in r.output, r.output
        assert "--instance-dir and" not in r.output and not (tmp_path / "bad").exists()


def test_repeats_weigh_the_draws(tmp_path):
    """A concept with repeats 3 is drawn three times as often as one with 1; equal repeats draw as none do."""
    import torch
    from PIL import Image
    from minidream.training.batches import weighted
    from minidream.training.dataset import Example
    im = Image.new("RGB", (16, 16))
    pool = [Example(im, tmp_path / f"{k}.png", "p", k, (16, 16), repeats=r) for k, r in enumerate((3, 1, 3))]
    assert weighted(pool, [0, 1, 2]) == [0, 0, 0, 1, 2, 2, 2]
    same = [Example(im, tmp_path / f"{k}.png", "p", k, (16, 16), repeats=10) for k in range(3)]
    assert weighted(same, [0, 1, 2]) == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor(weighted(pool, [0, 1, 2]))[torch.randint(0, 7, (7000,), generator=g)]
    assert abs((draws == 1).float().mean().item() - 1 / 7) < 0.02


def test_concepts_take_repeats_from_kohya_folders(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """A --concepts entry whose instance_dir is `5_ohwx cat` needs nothing else: its prompt, class and repeats come
    from the name; an entry's "repeats" key wins over the name."""
    import json
    a = kohya_folder(instance_dir, tmp_path, "5_ohwx cat")
    b = kohya_folder(instance_dir, tmp_path, "2_sks dog")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"instance_dir": str(a)}, {"instance_dir": str(b), "repeats": 7}]))
    out = tmp_path / "run"
    r = run_cli(*base_args(sd1_dir, out, "--concepts", concepts, "--steps", 1))
    assert r.exit_code == 0, r.output
    data = json.loads((out / "data.json").read_text())
    got = {(x["kind"], x["prompt"], x["repeats"]) for x in data["images"]}
    assert got == {("instance", "ohwx cat", 5), ("instance", "sks dog", 7), ("class", "cat", 1), ("class", "dog", 1)}


def test_kohya_folder_rules_are_one_for_the_command_line_and_a_concepts_entry(tmp_path):
    """The same kohya-named folder with the same settings gives the same prompts, identifier and repeats whether the
    command line or a --concepts entry names it (one function reads the names: concepts_file.kohya_rules)."""
    from minidream.training.concepts_file import concepts, with_folder_names
    from minidream.training.config import TrainConfig
    folder, out = tmp_path / "10_ohwx cat", tmp_path / "out"
    folder.mkdir()
    expected = {(): ("ohwx cat", "cat", "ohwx", 10), (("class_noun", "kitten"),): ("ohwx kitten", "kitten", "ohwx", 10),
                (("identifier", "zwx"), ("repeats", 3)): ("zwx cat", "cat", "zwx", 3)}
    for extra, want in expected.items():
        line = with_folder_names(TrainConfig(out=str(out), instance_dir=str(folder), **dict(extra)))
        entry = TrainConfig(out=str(out), concepts=({"instance_dir": str(folder), **dict(extra)},))
        for cfg in (line, entry):
            c, = concepts(cfg, out)
            assert (c.instance_prompt, c.class_prompt, c.identifier, c.repeats) == want, (extra, cfg is line)


def masks_for(photos, folder, value=None, size=None):
    """A mask PNG beside each photo's name: all `value`, or the left half white."""
    from PIL import Image
    folder.mkdir()
    for p in sorted(photos.glob("*.png")):
        w, h = size or Image.open(p).size
        m = Image.new("L", (w, h), 0 if value is None else value)
        if value is None:
            m.paste(255, (0, 0, w // 2, h))
        m.save(folder / f"{p.stem}.png")
    return folder


def test_a_mask_the_centre_crop_hides_is_said(tmp_path, capsys):
    """A mask white only where the centre crop cuts the photo away trains nothing of it: a warning names the photo
    (as for an all-black mask file); with --random-crop, which reaches the whole photo, none."""
    from dataclasses import replace
    from PIL import Image
    from minidream.training.concepts_file import concepts
    from minidream.training.config import TrainConfig
    from minidream.training.dataset import instance_examples
    photos, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    photos.mkdir()
    masks.mkdir()
    for k in range(3):  # 96x32 photos, centre-cropped to their middle 32 columns
        Image.new("RGB", (96, 32), (k * 40, 100, 100)).save(photos / f"{k}.png")
        m = Image.new("L", (96, 32), 0)
        if k:  # 1: white left of the crop only; 2: white inside it
            m.paste(255, (0, 0, 16, 32) if k == 1 else (40, 0, 56, 32))
        m.save(masks / f"{k}.png")
    cfg = TrainConfig(out=str(out), instance_dir=str(photos), class_noun="dog", mask_dir=str(masks), resolution=32)
    for center, said in ((True, ["1.png"]), (False, [])):
        run = replace(cfg, center_crop=center)
        instance_examples(concepts(run, out), run, [(32, 32)])
        err = capsys.readouterr().err
        assert [n for n in ("0.png", "1.png", "2.png") if f"mask of {n} is all black inside" in err] == said, err
        assert "the mask of 0.png is all black:" in err  # the all-black file's own warning


def test_a_mask_follows_the_crop_and_the_flip():
    """The mask goes through the photo's resize, crop and mirror: a gray photo that is its own mask stays so."""
    import random
    from PIL import Image
    from minidream.training.photos import view
    mask = Image.new("L", (60, 40), 0)
    mask.paste(255, (0, 0, 20, 40))  # the left third
    photo = Image.merge("RGB", [mask] * 3)
    for seed in range(6):
        x, _, m = view(photo, (16, 32), False, seed % 2 == 1, random.Random(seed), mask)
        assert m.shape == (1, 32, 16)
        assert (m[0] - (x[0] + 1) / 2).abs().mean() < 0.03, seed


def test_masked_loss_averages_over_the_mask():
    from minidream.training.step import dreambooth_loss
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    mask = torch.ones(3, 1, 2, 2)
    mask[0, 0, 0] = 0  # the first instance row: its top row of cells is background
    mask[1] = 0.0  # the second: nothing of the subject
    loss, inst, prior = dreambooth_loss(pred, target, 2, 0.5, mask=mask)
    err = (pred - target).square()
    assert torch.allclose(inst, (err[0, :, 1].mean() + 0) / 2)
    assert torch.allclose(prior, err[2].mean()) and torch.allclose(loss, inst + 0.5 * prior)
    plain = dreambooth_loss(pred, target, 2, 0.5, mask=torch.ones(3, 1, 2, 2))
    assert torch.allclose(plain[0], dreambooth_loss(pred, target, 2, 0.5)[0])


def test_an_all_zero_mask_without_prior_trains_nothing(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    import json
    masks = masks_for(instance_dir, tmp_path / "masks", value=0)
    out = tmp_path / "run"
    r = run_cli(*base_args(sd1_dir, out, "--instance-dir", instance_dir, "--class-noun", "dog", "--no-prior",
                           "--train", "lora", "--weight-decay", 0, "--steps", 2, "--mask-dir", masks,
                           "--save-as", "lora-diffusers", "--random-crop", "--flip", 0.5))
    assert r.exit_code == 0, r.output
    up = {k: v for k, v in load_file(out / LORA).items() if "lora_B" in k or "lora.up" in k}
    assert up and all(not v.any() for v in up.values())  # LoRA's B starts at zero and stayed there
    assert all(json.loads(x)["loss_instance"] == 0 for x in (out / "metrics.jsonl").read_text().splitlines())
    data = json.loads((out / "data.json").read_text())
    assert {x["mask"] for x in data["images"] if x["kind"] == "instance"} == \
        {str(masks / f"{p.stem}.png") for p in instance_dir.glob("*.png")}
    # a run that trained without masks cannot have them added on resume (a moved mask folder may be given anew)
    plain = tmp_path / "plain"
    assert run_cli(*base_args(sd1_dir, plain, "--instance-dir", instance_dir, "--class-noun", "dog", "--no-prior",
                              "--steps", 1)).exit_code == 0
    r = run_cli("train", "--out", plain, "--resume", "latest", "--steps", 2, "--mask-dir", masks)
    assert r.exit_code == 2 and "this run trained without --mask-dir" in r.output, r.output


def test_half_masks_and_alpha_masks_train(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """A half mask changes the loss (cached latents, buckets too); a photo's alpha channel is the same mask."""
    import json
    from PIL import Image
    half = masks_for(instance_dir, tmp_path / "masks")
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for p in sorted(instance_dir.glob("*.png")):
        im = Image.open(p).convert("RGBA")
        im.putalpha(Image.open(half / p.name))
        im.save(rgba / p.name)
    first = {}
    for name, args in (("plain", ["--instance-dir", instance_dir]),
                       ("dir", ["--instance-dir", instance_dir, "--mask-dir", half]),
                       ("alpha", ["--instance-dir", rgba, "--alpha-mask"])):
        out = tmp_path / name
        r = run_cli(*base_args(sd1_dir, out, *args, "--class-noun", "dog", "--steps", 1, "--cache-latents",
                               "--aspect-buckets", "--flip", 0.5))
        assert r.exit_code == 0, r.output
        first[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss_instance"]
    assert first["dir"] != first["plain"] and abs(first["dir"] - first["alpha"]) < 1e-6


def test_a_16_bit_mask_is_scaled_as_photos_are(tmp_path):
    """A real 16-bit greyscale PNG, half white and half 1.5% grey: the grey half reads near 0, not clipped to 1."""
    import numpy as np
    from PIL import Image
    from minidream.training.photos import load_masks, view
    photo = tmp_path / "photos" / "a.png"
    photo.parent.mkdir()
    Image.new("RGB", (8, 8), (100, 50, 0)).save(photo)
    masks = tmp_path / "masks"
    masks.mkdir()
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[:, 4:] = 983  # 1.5% of white
    Image.fromarray(values).save(masks / "a.png")
    assert Image.open(masks / "a.png").mode.startswith("I")  # what the file holds: 16 bits
    (mask, where), = load_masks([photo], [Image.open(photo)], str(masks), alpha=False)
    m = view(Image.open(photo).convert("RGB"), 8, True, False, None, mask)[2]
    assert where == masks / "a.png" and m[0, :, :4].min() == 1 and m[0, :, 4:].max() < 0.02


@pytest.mark.parametrize("case,needle", [
    ("photos", "is the photos' folder"),
    ("missing", "--mask-dir: no mask"),
    ("size", "give a mask of the photo's size"),
    ("no-alpha", "has no alpha channel"),
    ("both", "pass one of them"),
])
def test_bad_masks_are_one_line_before_anything_is_written(sd1_dir, instance_dir, tmp_path, case, needle):  # noqa: F811
    masks = tmp_path / "masks"
    if case == "missing":
        masks_for(instance_dir, masks)
        next(masks.iterdir()).unlink()
    elif case == "size":
        masks_for(instance_dir, masks, size=(8, 8))
    else:
        masks_for(instance_dir, masks)
    extra = {"missing": ["--mask-dir", masks], "size": ["--mask-dir", masks], "no-alpha": ["--alpha-mask"],
             "both": ["--mask-dir", masks, "--alpha-mask"], "photos": ["--mask-dir", instance_dir]}[case]
    out = tmp_path / "run"
    r = run_cli(*base_args(sd1_dir, out, "--instance-dir", instance_dir, "--class-noun", "dog", *extra))
    assert r.exit_code == 2 and needle in r.output and not out.exists(), r.output


def cell(png, row, col, size):
    """The image at (row, col) of a labelled grid (plots.labelled_grid: its layout is in the PNG's text), back at
    the model's size (h, w) from the grid's nearest-neighbour zoom."""
    import json
    import numpy as np
    from PIL import Image
    img = Image.open(png)
    layout = json.loads(img.text["layout"])
    a = torch.from_numpy(np.array(img))
    (x0, y0), (dx, dy), z = layout["origin"], layout["step"], layout["zoom"]
    (h, w), top, left = size, y0 + row * dy, x0 + col * dx
    return a[top:top + h * z:z, left:left + w * z:z]


def test_validation_grids_rows_and_losses(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """A step-0 grid of the base model (the same whatever the run's lr); a --validation-file row with its own
    negative prompt, guidance, size, seed and steps draws what `sample` draws with those settings; the validation
    loss at steps 0, 2, 4 on fixed triples (the same at step 0, whatever the lr); and none of it changes what
    trains (the same weights as a run without validation)."""
    import json
    import subprocess
    import sys
    from PIL import Image
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "a red dog", "negative_prompt": "blue", "guidance": 3.0, "height": 48,
                                 "width": 32, "seed": 11, "steps": 3}]))
    args = ["--train", "lora", "--save-as", "lora-diffusers", "--steps", 4, "--validation-prompt", "a dog",
            "--validation-file", rows, "--validation-every", 2, "--validation-images", 2, "--validation-steps", 2]
    runs = {}
    for lr in (1e-3, 5e-2):
        out = runs[lr] = tmp_path / f"lr{lr}"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--lr", lr))
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in (out / "samples").iterdir()) == \
            ["final.png", "step-000000.png", "step-000002.png", "step-000004.png"]
    a, b = (Image.open(runs[lr] / "samples" / "step-000000.png") for lr in runs)
    assert json.loads(a.text["layout"])["tile"] == [3 * 32, 3 * 48] and a.tobytes() == b.tobytes()  # 32 px: x3
    assert Image.open(runs[1e-3] / "samples" / "step-000004.png").tobytes() != \
        Image.open(runs[5e-2] / "samples" / "step-000004.png").tobytes()
    held = {lr: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] for lr, out in runs.items()}
    held = {lr: [x for x in lines if "val_loss_instance" in x] for lr, lines in held.items()}
    assert [x["step"] for x in held[1e-3]] == [0, 2, 4] and all("val_loss_prior" in x for x in held[1e-3])
    assert held[1e-3][0] == held[5e-2][0] and held[1e-3][2] != held[5e-2][2]
    # the file's row is `sample` with its settings (the model's own sampler, as the grid's)
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "a red dog",
                        "--negative-prompt", "blue", "--guidance", "3", "--height", "48", "--width", "32", "--seed",
                        "11", "--steps", "3", "--num-images", "2", "--batch-size", "2", "--out", str(tmp_path / "s"),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import numpy as np
    for col in range(2):  # within 1/255: the trainer's process and `sample`'s may split a matmul differently
        want = torch.from_numpy(np.array(Image.open(tmp_path / "s" / f"{col:04d}.png"))).int()
        got = cell(runs[1e-3] / "samples" / "step-000000.png", 1, col, (48, 32)).int()
        assert (got - want).abs().max() <= 1
    # validation changes nothing that trains
    plain = tmp_path / "plain"
    assert run_cli(*train_args(sd1_dir, instance_dir, plain, "--train", "lora", "--save-as", "lora-diffusers",
                               "--steps", 4)).exit_code == 0
    assert same_file(plain / LORA, runs[1e-3] / LORA)


@pytest.mark.parametrize("rows,needle", [
    ([{"prompt": "x", "size": 3}], "unknown key(s) size"),
    ([{"negative_prompt": "x"}], "needs \"prompt\""),
    ([{"prompt": "x", "steps": 0}], "entry 0: steps must be at least 1"),
    ([{"prompt": "x", "guidance": "high"}], "guidance must be a number"),
    ([{"prompt": "x", "height": 20}], "entry 0: height"),
    ({"prompt": "x"}, "expected a non-empty list"),
])
def test_a_bad_validation_file_is_one_line(sd1_dir, instance_dir, tmp_path, rows, needle):  # noqa: F811
    import json
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--validation-file", f))
    assert r.exit_code == 2 and needle in r.output and not out.exists(), r.output


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_our_single_file_loads_without_config(sd1_dir, sd2_dir, tmp_path, family):
    """Our single-file export carries its architecture (the components' configs, the scheduler's) in its metadata;
    a file without it that is no known preset says to pass --preset or --config."""
    from minidream.formats import loading
    from minidream.formats.files import ModelError, save_safetensors
    from minidream.formats.single_file import save_single_file, to_single_file
    folder = sd1_dir if family == "sd1" else sd2_dir
    m = loading.load(str(folder))
    f = tmp_path / "model.safetensors"
    save_single_file(m, f)
    back = loading.load(str(f), tokenizer=str(folder / "tokenizer"))
    assert back.scheduler == m.scheduler and back.unet.config == m.unet.config
    assert back.text_encoder.config == m.text_encoder.config
    for a, b in ((m.unet, back.unet), (m.vae, back.vae), (m.text_encoder, back.text_encoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    bare = tmp_path / "bare.safetensors"
    save_safetensors(to_single_file(m), bare)
    with pytest.raises(ModelError, match="pass --preset"):
        loading.load(str(bare), tokenizer=str(folder / "tokenizer"))


def test_a_learned_token_stays_out_of_the_single_file(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """--train-token with --save-as single-file: the file has the base's vocabulary (diffusers loads it with the base's
    config), the token is in learned_embeds.safetensors, and the two together draw what the diffusers export draws."""
    from diffusers import StableDiffusionPipeline
    from minidream.formats import loading
    from minidream.formats.embeddings import add_embedding
    from minidream.sampling.pipeline import SamplingParams, generate
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "attention", "--train-token", "--lr", 1e-2,
                            "--token-lr", 5e-2, "--save-as", "single-file", "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    table = load_file(out / "model.safetensors")[key]
    base = load_file(sd1_dir / "text_encoder" / "model.safetensors")
    assert table.shape == next(v for k, v in base.items() if k.endswith("token_embedding.weight")).shape
    StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(sd1_dir), local_files_only=True,
                                             safety_checker=None, requires_safety_checker=False)
    single = loading.load(str(out / "model.safetensors"), tokenizer=str(sd1_dir / "tokenizer"))
    add_embedding(single, out / "learned_embeds.safetensors", None, False)

    def draw(model):
        return generate(model, ["a photo of <sks> dog"], SamplingParams(steps=3, height=16, width=16), progress=False,
                        generator=torch.Generator().manual_seed(1))
    assert (draw(single).int() - draw(loading.load(str(out / "model"))).int()).abs().max() <= 1


def test_class_images_that_cannot_cover_the_buckets_are_refused_before_drawing(sd1_dir, tmp_path):
    """Photos in three aspect buckets and 2 class images to draw: a one-line error before any image is drawn."""
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, size in enumerate(((64, 16), (16, 64), (32, 32))):
        Image.new("RGB", size, (40 * k, 90, 200)).save(photos / f"{k}.png")
    out = tmp_path / "run"
    r = run_cli(*base_args(sd1_dir, out, "--instance-dir", photos, "--class-noun", "dog", "--aspect-buckets",
                           "--resolution", 32, "--steps", 1))
    assert r.exit_code == 2 and "raise --num-class-images to at least 3" in r.output, r.output
    assert not out.exists()
    r = run_cli(*base_args(sd1_dir, out, "--instance-dir", photos, "--class-noun", "dog", "--aspect-buckets",
                           "--resolution", 32, "--steps", 1, "--num-class-images", 3))
    assert r.exit_code == 0, r.output


def test_resuming_an_earlier_checkpoint_replaces_the_later_line(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    """--resume FILE of step 2 in a run that reached 6: the later checkpoints and snapshot are set aside (so --resume
    latest follows the new line), a snapshot of the resumed step that is missing (a stop while it was written) is
    written again, and a checkpoint of another run is refused before anything changes."""
    import shutil
    args = ["--train", "lora", "--save-as", "lora-diffusers", "--no-prior", "--checkpoint-every", 2, "--keep-last", 0]
    out = tmp_path / "run"
    assert run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 6, "--save-every", 2)).exit_code == 0
    shutil.rmtree(out / "snapshots" / "step-000002")
    r = run_cli("train", "--out", out, "--resume", out / "checkpoints" / "step-000002.safetensors", "--steps", 4)
    assert r.exit_code == 0 and "moved to" in r.output, r.output
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002.safetensors",
                                                                           "step-000004.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints" / "abandoned").iterdir()) == ["step-000004.safetensors",
                                                                                    "step-000006.safetensors"]
    assert (out / "snapshots" / "step-000002" / LORA).is_file()
    # the abandoned line's snapshot is set aside too (--keep-snapshots would count it); step 4 now ends the run,
    # so its export is OUT's, not a snapshot
    assert (out / "snapshots" / "abandoned" / "step-000004" / LORA).is_file()
    assert sorted(p.name for p in (out / "snapshots").glob("step-*")) == ["step-000002"]
    other = tmp_path / "other"
    assert run_cli(*train_args(sd1_dir, instance_dir, other, "--train", "attention", "--steps", 1,
                               "--checkpoint-every", 1)).exit_code == 0
    before = (out / "run.json").read_text()
    r = run_cli("train", "--out", out, "--resume", other / "checkpoints" / "step-000001.safetensors", "--steps", 2)
    assert r.exit_code == 2 and "another run" in r.output, r.output
    assert (out / "run.json").read_text() == before


def test_a_run_started_with_relative_paths_resumes_from_anywhere(sd1_dir, instance_dir, tmp_path):  # noqa: F811
    import json
    import os
    import shutil
    import subprocess
    import sys
    shutil.copytree(instance_dir, tmp_path / "photos")
    base = [sys.executable, "-m", "minidream", "train", "--out", "run", "--resolution", "16", "--steps", "1",
            "--no-prior", "--checkpoint-every", "0", "--train", "lora", "--save-as", "lora-diffusers"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([*base, "--model", str(sd1_dir), "--instance-dir", "photos", "--class-noun", "dog"],
                       cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["instance_dir"] == str(tmp_path / "photos")
    r = subprocess.run([sys.executable, "-m", "minidream", "train", "--out", str(tmp_path / "run"), "--resume",
                        "latest", "--steps", "2"], cwd="/", capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "at step 1" in r.stderr, r.stderr


def test_a_resume_refuses_another_base_model_but_takes_the_same_one_moved(sd1_dir, sd2_dir, instance_dir,  # noqa: F811
                                                                          tmp_path):
    import shutil
    out = tmp_path / "run"
    args = ["--train", "lora", "--no-prior", "--save-as", "lora-diffusers", "--checkpoint-every", 1]
    assert run_cli(*train_args(sd1_dir, instance_dir, out, *args, "--steps", 1)).exit_code == 0
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 2, "--model", sd2_dir)
    assert r.exit_code == 2 and "not the base model this run trained on" in r.output, r.output
    moved = tmp_path / "moved"
    shutil.copytree(sd1_dir, moved)
    r = run_cli("train", "--out", out, "--resume", "latest", "--steps", 2, "--model", moved)
    assert r.exit_code == 0, r.output


def test_a_grid_that_overflows_is_skipped_and_sure_overflows_are_refused(sd1_dir, instance_dir, tmp_path,  # noqa: F811
                                                                         capsys):
    """A validation grid whose sampling really overflows (a UNet output layer scaled to 1e38: its latents go inf)
    is skipped with a warning, and training goes on; a guidance sure to overflow (1e308) is refused in one line
    before anything is written, for the class images and for a --validation-file row alike."""
    from minidream.formats import loading
    from minidream.training.config import TrainConfig
    from minidream.training.validation import validation_grid
    model = loading.load(str(sd1_dir))
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(1e38)
    cfg = TrainConfig(out=str(tmp_path), validation_prompts=("a photo of a dog",), validation_images=1,
                      validation_steps=2, resolution=16)
    png = tmp_path / "samples" / "step-000002.png"
    validation_grid(model, cfg, png)
    assert "the validation grid step-000002.png was skipped" in capsys.readouterr().err and not png.exists()
    rows = tmp_path / "rows.json"
    rows.write_text('[{"prompt": "a dog", "guidance": 1e308}]')
    for extra, needle in ((["--class-guidance", "1e308"], "--class-guidance must be in [0, 1000]"),
                          (["--validation-file", rows], "guidance")):
        out = tmp_path / "run"
        r = run_cli(*train_args(sd1_dir, instance_dir, out, *extra))
        assert r.exit_code == 2 and needle in r.output and not out.exists(), r.output
