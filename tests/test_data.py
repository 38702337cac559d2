"""Training data as users bring it: aspect-ratio buckets, caption files, several concepts, OUT/data.json, and the
one-line errors for bad data."""
import json

import torch
from PIL import Image

from minidream.formats import loading
from minidream.training.dataset import buckets, nearest_bucket
from tests.test_train import run_cli, train_args


def folder(path, sizes, seed=0, captions=None):
    path.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        g = torch.Generator().manual_seed(seed + i)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(path / f"{i}.png")
        if captions and captions[i] is not None:
            (path / f"{i}.txt").write_bytes(captions[i] if isinstance(captions[i], bytes) else captions[i].encode())
    return path


def test_buckets_cover_about_the_resolution_squared():
    shapes = buckets(512, 64, 2.0)
    assert (512, 512) in shapes and (640, 384) in shapes and (384, 640) in shapes
    for w, h in shapes:
        assert w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2 and 0.7 * 512 ** 2 <= w * h <= 512 ** 2
    assert nearest_bucket((3000, 2000), shapes) == (640, 384)  # 5:3, the nearest to 3:2
    assert nearest_bucket((1000, 1000), shapes) == (512, 512)
    assert nearest_bucket((4000, 1000), shapes) in [(w, h) for w, h in shapes if w / h == max(a / b for a, b in shapes)]


def test_aspect_buckets_and_captions(sd1_dir, tmp_path):
    """Wide and tall photos train in their own buckets (class images drawn at the same shapes), a caption
    file is its image's prompt, and data.json lists all of it."""
    inst = folder(tmp_path / "inst", [(64, 32), (64, 32), (32, 64), (48, 48)],
                  captions=["a photo of sks dog on grass", " \n", None, None])
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, inst, out, "--aspect-buckets", "--caption-ext", ".txt", "--resolution", 32,
                            "--num-class-images", 4, "--steps", 6, "--cache-latents"))
    assert r.exit_code == 0, r.output
    assert "1 caption file(s) are empty (1.txt): those images train on the instance prompt" in r.output
    data = json.loads((out / "data.json").read_text())
    images = {(d["kind"], d["file"].split("/")[-1]): d for d in data["images"]}
    assert images[("instance", "0.png")]["prompt"] == "a photo of sks dog on grass"
    assert images[("instance", "0.png")]["caption_file"].endswith("0.txt")
    assert images[("instance", "1.png")]["prompt"] == "a photo of sks dog"
    wide, tall = images[("instance", "0.png")]["bucket"], images[("instance", "2.png")]["bucket"]
    assert wide[0] > wide[1] and tall[0] < tall[1] and images[("instance", "3.png")]["bucket"] == [32, 32]
    klass = [d for d in data["images"] if d["kind"] == "class"]
    assert len(klass) == 4 and {tuple(d["bucket"]) for d in klass} == {tuple(wide), tuple(tall), (32, 32)}
    for d in klass:  # generated at their bucket's shape
        assert list(Image.open(d["file"]).size) == d["bucket"] and d["serves_concept"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_text_conditioning_rows_are_each_prompts_own(sd1_dir):
    from minidream.training.batches import TextConditioning
    from minidream.training.trainable import Trainable
    from minidream.models.stable_diffusion import encode_text
    m = loading.load(str(sd1_dir))
    nothing_trains = Trainable([], [], [])
    cfg = type("C", (), {"text_encoder_steps": 0})()
    text = TextConditioning(m, cfg, nothing_trains, ["a photo of sks dog", "a photo of dog"])
    prompts = ["a photo of sks dog on grass", "a photo of sks dog", "a photo of dog", "a photo of sks dog on grass"]
    got = text(0, prompts)["context"]
    with torch.no_grad():
        for row, p in zip(got, prompts):
            assert (row - encode_text(m, [p])["context"][0]).abs().max() <= 1e-5


def test_two_concepts_get_their_own_class_images(sd1_dir, tmp_path):
    a = folder(tmp_path / "a", [(40, 48)] * 3)
    b = folder(tmp_path / "b", [(48, 40)] * 3, seed=10)
    spec = tmp_path / "concepts.json"
    spec.write_text(json.dumps([
        {"instance_dir": str(a), "identifier": "sks", "class_noun": "dog", "num_class_images": 2},
        {"instance_dir": str(b), "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of a cat",
         "class_dir": str(tmp_path / "cats")}]))
    out = tmp_path / "run"
    r = run_cli("train", "--model", sd1_dir, "--concepts", spec, "--out", out, "--resolution", 16,
                "--num-class-images", 3, "--class-steps", 2, "--steps", 3, "--checkpoint-every", 0)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "data.json").read_text())
    by = {}
    for d in data["images"]:
        by.setdefault((d["kind"], d["concept"]), []).append(d)
    assert len(by[("instance", 0)]) == 3 and by[("instance", 1)][0]["prompt"] == "a photo of zwx cat"
    assert len(by[("class", 0)]) == 2 and len(by[("class", 1)]) == 3  # per-concept count, else --num-class-images
    assert {d["prompt"] for d in by[("class", 1)]} == {"a photo of a cat"}
    assert all("cats" in d["file"] for d in by[("class", 1)])
    assert all("concept-0" in d["file"] for d in by[("class", 0)])
    assert Image.open(by[("class", 1)][0]["file"]).text["prompt"] == "a photo of a cat"


def test_bad_data_is_one_line(sd1_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ok = folder(tmp_path / "ok", [(40, 48)] * 2)
    wide = folder(tmp_path / "wide", [(64, 16)] * 2)
    squares = folder(tmp_path / "squares", [(16, 16)] * 2, seed=5)
    latin1 = folder(tmp_path / "latin1", [(40, 48)], captions=["café".encode("latin-1")])

    def spec(name, body):
        (tmp_path / name).write_text(json.dumps(body))
        return tmp_path / name
    cases = [
        (["--concepts", spec("e.json", [{"instance_dir": str(empty), "identifier": "sks", "class_noun": "dog"}])],
         "no images"),
        (["--concepts", spec("k.json", [{"instance_dir": str(ok), "identifier": "sks"}])], "class_noun"),
        (["--concepts", spec("u.json", [{"instance_dir": str(ok), "instance_prompt": "x", "class_prompt": "y",
                                         "colour": 1}])], "unknown key"),
        (["--concepts", spec("l.json", {"instance_dir": str(ok)})], "list of objects"),
        (["--instance-dir", latin1, "--class-noun", "dog", "--caption-ext", "txt", "--no-prior"], "not UTF-8"),
        (["--instance-dir", wide, "--class-noun", "dog", "--aspect-buckets", "--class-dir", squares,
          "--num-class-images", 2], "no class image"),
        (["--class-noun", "dog"], "--instance-dir and --class-noun"),
    ]
    for args, needle in cases:
        out = tmp_path / f"o{len(needle)}"
        r = run_cli("train", "--model", sd1_dir, "--out", out, "--resolution", 16, "--steps", 1, "--class-steps", 1,
                    *args)
        assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, (args, r.output)


def test_shuffled_tags_and_caption_dropout_follow_their_rule():
    """--shuffle-tags keeps the first --keep-tokens tags and permutes the rest; --caption-dropout empties a prompt
    with its probability; both draw from the run's generator, and only when asked (a run without them draws what
    it always drew)."""
    from types import SimpleNamespace
    from minidream.training.batches import varied
    prompts = ["sks, dog, red collar, grass, sunny", "sks, dog", "a photo of sks dog"] * 200
    g = torch.Generator().manual_seed(0)
    off = SimpleNamespace(shuffle_tags=False, keep_tokens=0, caption_dropout=0.0)
    state = g.get_state()
    assert varied(prompts, off, g) == prompts and torch.equal(g.get_state(), state)
    on = SimpleNamespace(shuffle_tags=True, keep_tokens=1, caption_dropout=0.25)
    got = varied(prompts, on, g)
    kept = [(p, q) for p, q in zip(prompts, got) if q]
    assert 0.2 < 1 - len(kept) / len(got) < 0.3  # dropped about a quarter
    for p, q in kept:
        tags, shuffled = p.split(", "), q.split(", ")
        assert shuffled[0] == tags[0] and sorted(shuffled) == sorted(tags)
    orders = {q for p, q in kept if p.startswith("sks, dog, red")}
    assert len(orders) > 10  # 4! orders of the tags after the first
    again = varied(prompts, on, torch.Generator().manual_seed(0).set_state(state))
    assert again == got


def test_a_run_with_shuffled_tags_and_caption_dropout(sd1_dir, tmp_path):
    inst = folder(tmp_path / "inst", [(32, 32)] * 3, captions=["sks, dog, grass, sun", "sks, dog, sofa", None])
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, inst, out, "--caption-ext", ".txt", "--shuffle-tags", "--keep-tokens", 1,
                            "--caption-dropout", 0.3, "--train", "lora", "--no-prior", "--steps", 4))
    assert r.exit_code == 0, r.output
    data = json.loads((out / "data.json").read_text())
    assert data["captions"] == {"dropout": 0.3, "shuffle_tags": True, "keep_tokens": 1}
    r = run_cli(*train_args(sd1_dir, inst, tmp_path / "bad", "--shuffle-tags", "--cache-text-encoder-outputs",
                            "disk"))
    assert r.exit_code != 0 and "--shuffle-tags makes a new prompt each step" in r.output
    r = run_cli(*train_args(sd1_dir, inst, tmp_path / "bad", "--keep-tokens", 2))
    assert r.exit_code != 0 and "--keep-tokens keeps tags in place under --shuffle-tags" in r.output
