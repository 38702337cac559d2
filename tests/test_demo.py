"""The embedded demo: the world, the shipped model and recogniser, and DreamBooth's claims measured on it."""
import json
import random

import pytest
import torch

from minidream import world
from minidream.demo import DEMO_DIR, load_recognizer, run_demo
from minidream.loading import load

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model_index.json").exists(), reason="demo model not built")


def test_world_is_deterministic_and_the_subject_is_never_pretrained():
    a = [world.pretraining_example(random.Random(3)) for _ in range(2)]
    assert a[0][1] == a[1][1] and a[0][0].tobytes() == a[1][0].tobytes()
    rng = random.Random(0)
    assert not any(world.pretraining_example(rng)[2].is_subject() for _ in range(3000))
    assert all(t.size == (world.SIZE, world.SIZE) for t in world.subject_images(4))


def test_demo_model_ships_small_and_loads_through_the_loader():
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*.safetensors"))
    assert size <= 20 * 2 ** 20
    m = load(str(DEMO_DIR))
    assert m.unet.cfg.sample_size == 8 and len(m.tokenizer) == m.text_encoder.cfg.vocab_size
    record = json.loads((DEMO_DIR / "PRETRAIN.json").read_text())
    assert {"command", "seed", "device", "wall_time_s"} <= record.keys()


def test_recognizer_reads_the_world():
    """Its accuracy on fresh renders (the number stated in PRETRAIN.json is measured the same way)."""
    import numpy as np
    net = load_recognizer()
    rng = random.Random(4242)
    toys = [world.random_toy(rng, allow_subject=True) for _ in range(200)]
    pred = net.predict(torch.stack([torch.from_numpy(np.array(world.render(t))) for t in toys]))
    for k in world.ATTRIBUTES:
        assert sum(p[k] == getattr(t, k) for p, t in zip(pred, toys)) / len(toys) >= 0.95, k


def test_dreambooth_binds_the_subject_and_prior_preservation_lowers_pres(tmp_path):
    with_prior = run_demo(tmp_path / "with", prior=True, grids=False)
    without = run_demo(tmp_path / "without", prior=False, grids=False)
    # The base model never draws the subject (fidelity ~0). Seed 0's fidelity is 0.625 today and moves by
    # ±0.2 with seed or benign numeric changes (the demo is not yet robust, see the README), so the bar is
    # what a broken DreamBooth would fall under.
    assert with_prior["subject_fidelity"] >= 0.4, with_prior
    assert with_prior["PRES"] < without["PRES"], (with_prior, without)
