"""--token-vectors N: a learned token of N embedding rows (textual inversion's multi-vector tokens), written as one
(N, dim) entry (SDXL: clip_l and clip_g), which diffusers' load_textual_inversion and `sample --embedding` read with
the same image; the merged diffusers folder keeps `<tok>_1`, … in its tokenizer, which both expand."""
import numpy as np
import torch
from safetensors.torch import load_file

from minidream.formats import loading
from minidream.formats.embeddings import add_embedding
from minidream.sampling.pipeline import SamplingParams, generate
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)

PROMPT = "a photo of <sks> dog"


def ours(model):
    return generate(model, [PROMPT], SamplingParams(steps=3, height=16, width=16), progress=False,
                    generator=torch.Generator().manual_seed(1))


def theirs(pipe):
    pipe.set_progress_bar_config(disable=True)
    img = pipe(PROMPT, num_inference_steps=3, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(1)).images
    return torch.from_numpy((img * 255).round().astype(np.uint8))


def learn(model_dir, instance_dir, out):
    # the UNet moves by at most lr = 1e-9 steps: the token's rows are what differ from the base
    r = run_cli(*train_args(model_dir, instance_dir, out, "--train", "attention", "--train-token", "--token-vectors",
                            3, "--lr", 1e-9, "--token-lr", 0.1, "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    return load_file(out / "learned_embeds.safetensors")


def test_a_three_vector_token_gives_diffusers_image(sd1_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    emb = learn(sd1_dir, instance_dir, out)
    assert list(emb) == ["<sks>"] and emb["<sks>"].shape == (3, 32)
    assert not torch.equal(emb["<sks>"][0], emb["<sks>"][1]), "each vector trains on its own"
    kw = dict(safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **kw)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    want = theirs(pipe)
    base = loading.load(str(sd1_dir))
    assert add_embedding(base, out / "learned_embeds.safetensors") == ["<sks>", "<sks>_1", "<sks>_2"]
    assert (ours(base).int() - want.int()).abs().max() <= 1  # `sample --embedding`
    tuned = loading.load(str(out / "model"))
    assert len(tuned.tokenizer.encode("<sks>")) == 3
    assert (ours(tuned).int() - want.int()).abs().max() <= 1
    assert (theirs(StableDiffusionPipeline.from_pretrained(out / "model", **kw)).int() - want.int()).abs().max() <= 1


def test_sdxl_three_vector_token_in_both_encoders(xl_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    out = tmp_path / "run"
    emb = learn(xl_dir, instance_dir, out)
    assert emb["clip_l"].shape == (3, 32) and emb["clip_g"].shape == (3, 48)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False)
    for key, tok, te in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2,
                                                                           pipe.text_encoder_2)):
        pipe.load_textual_inversion(emb[key], token="<sks>", tokenizer=tok, text_encoder=te)
    want = theirs(pipe)
    tuned = StableDiffusionXLPipeline.from_pretrained(out / "model", add_watermarker=False)
    assert (theirs(tuned).int() - want.int()).abs().max() <= 1
    base = loading.load(str(xl_dir))
    add_embedding(base, out / "learned_embeds.safetensors")
    assert (ours(base).int() - ours(loading.load(str(out / "model"))).int()).abs().max() <= 1


def test_vectors_past_the_token_limit_are_refused_or_warned(sd1_dir, instance_dir, tmp_path):
    """74 vectors + "a photo of" + "dog" = 78 of CLIP's 75 positions: the token's last vectors would never train —
    one line before anything is written; sampling with such an embedding warns that the prompt is cut."""
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--train-token", "--token-vectors", 74))
    assert r.exit_code == 2 and "falls past the text encoder's 77-token limit" in r.output, r.output
    # the prompt was never given on the command line: the error says which prompt, and blames the vectors
    assert "--instance-prompt" not in r.output and "--token-vectors 74 makes <sks> that many tokens" in r.output
    assert not (out / "run.json").exists()
    base = loading.load(str(sd1_dir))
    emb = tmp_path / "e.safetensors"
    from safetensors.torch import save_file
    save_file({"<e>": torch.randn(74, 32) * 0.1}, emb)
    add_embedding(base, emb)
    assert base.tokenizer.truncated("a photo of <e> dog") == "<e> dog"
    save_file({"<n>": torch.full((2, 32), float("nan"))}, emb)
    import pytest
    from minidream.formats.files import ModelError
    with pytest.raises(ModelError, match="NaN or infinite"):
        add_embedding(base, emb)
