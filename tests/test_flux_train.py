"""DreamBooth on Flux.1: the objective of diffusers' train_dreambooth_lora_flux.py (the unshifted σ levels of [dev]'s
scheduler, its default uniform draw and unweighted velocity loss, the guidance input) with the same loss and
gradients; LoRA on diffusers' Flux targets with the exports read back (the diffusers file by FluxPipeline's
load_lora_weights, the kohya file in BFL's names by diffusers' converter and by us, its fused Q/K/V and linear1
exact); bit-exact resume; what applies to [dev] only refused on [schnell]."""
import pytest
import torch

from minidream.formats import loading
from minidream.models import flux
from minidream.models.flow_matching import Density, FlowProcess
from minidream.models.stable_diffusion import encode_text
from minidream.training.step import dreambooth_loss
from tests.conftest import assert_same_loss_and_grads, build_flux_pipeline_dir, max_rel_err
from tests.test_adapters import ours, theirs
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory, tiny_tokenizer, tiny_t5_tokenizer):
    return build_flux_pipeline_dir(tmp_path_factory.mktemp("flux-dev"), tiny_tokenizer, tiny_t5_tokenizer, seed=50)


def flux_args(folder, instance, out, *extra):
    return train_args(folder, instance, out, "--resolution", 32, *extra)


def test_timestep_draws_match_diffusers():
    """[dev]'s scheduler shifts by image size when it samples; training indexes its unshifted levels."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from minidream.models.flow_matching import PRESETS
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    u = compute_density_for_timestep_sampling("none", 64, generator=torch.Generator().manual_seed(3))
    want = sched.timesteps[(u * 1000).long()]
    got = FlowProcess(PRESETS["flux-dev"], Density("none")).draw_timesteps(64, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(got, want)


def test_one_step_matches_diffusers_flux_loss_and_gradients(flux_dir):
    """Same latents, noise and timesteps: our loss parts and transformer gradients equal those of diffusers'
    transformer with train_dreambooth_lora_flux.py's objective (packed z = (1-σ)x + σn at timestep t/1000, guidance
    3.5; v against n - x, unweighted; instance + λ·prior)."""
    from diffusers import FluxPipeline
    ref = FluxPipeline.from_pretrained(flux_dir)
    m = loading.load(str(flux_dir))
    ref.transformer.requires_grad_(True)
    m.denoiser.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 16, 4, 6, generator=g), torch.randn(4, 16, 4, 6, generator=g)
    t = torch.tensor([5.0, 300.0, 650.0, 990.0])
    prompts = ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    sigma = (t / 1000).view(-1, 1, 1, 1)
    noisy = (1 - sigma) * x + sigma * noise
    with torch.no_grad():
        ctx, pooled, text_ids = ref.encode_prompt(prompts, None, max_sequence_length=512)
    pred = ref.transformer(flux.pack(noisy), timestep=t / 1000, guidance=torch.full((4,), 3.5),
                           encoder_hidden_states=ctx, pooled_projections=pooled, txt_ids=text_ids,
                           img_ids=flux.image_ids(2, 3)).sample
    per_example = ((flux.unpack(pred, 4, 6) - (noise - x)) ** 2).reshape(4, -1).mean(1)
    ref_inst, ref_prior = per_example[:2].mean(), per_example[2:].mean()
    (ref_inst + 0.7 * ref_prior).backward()

    process = FlowProcess(m.scheduler, Density("none", precondition=False))
    with torch.no_grad():
        cond = encode_text(m, prompts)
    z = process.add_noise(x, noise, t)
    out = process.output(m.denoiser(z, t, **cond, guidance=torch.full((4,), 3.5)), z, t)
    loss, inst, prior = dreambooth_loss(out, process.target(x, noise, t), 2, 0.7, process.loss_weights(t))
    loss.backward()
    assert_same_loss_and_grads((inst, prior), (ref_inst, ref_prior), m.denoiser, ref.transformer)


def kohya_delta(pair: dict, name: str) -> torch.Tensor:
    down, up = pair[f"{name}.lora_down.weight"], pair[f"{name}.lora_up.weight"]
    return (up @ down) * (pair[f"{name}.alpha"] / down.shape[0])


def peft_delta(sd: dict, module: str) -> torch.Tensor:
    return sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]


def test_lora_exports_give_diffusers_images(flux_dir, instance_dir, tmp_path):
    """train --train lora --lora-targets all --train-text-encoder on Flux.1 [dev]: the diffusers LoRA file loads in
    FluxPipeline.load_lora_weights and draws what `sample --lora` draws; the kohya file holds each fused BFL module
    (qkv, linear1) as one pair whose product is exactly the parts' changes side by side, and draws the same image
    through `sample --lora`; the merged folder and BFL's file draw it too."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*flux_args(flux_dir, instance_dir, out, "--train", "lora", "--lora-targets", "all",
                           "--train-text-encoder", "--lr", 3e-2, "--save-as", "lora-diffusers", "--save-as",
                           "lora-kohya", "--save-as", "diffusers", "--save-as", "single-file"))
    assert r.exit_code == 0, r.output
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    peft, kohya = load_file(str(lora)), load_file(str(out / "lora_kohya.safetensors"))
    assert {k.split(".")[0] for k in peft} == {"transformer", "text_encoder"}
    assert any(".single_transformer_blocks.0.proj_mlp." in k for k in peft)
    fused = kohya_delta(kohya, "lora_unet_single_blocks_1_linear1")
    parts = [f"single_transformer_blocks.1.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert max_rel_err(fused, torch.cat([peft_delta(peft, p) for p in parts])) <= 1e-5
    fused = kohya_delta(kohya, "lora_unet_double_blocks_0_txt_attn_qkv")
    parts = [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"]
    assert max_rel_err(fused, torch.cat([peft_delta(peft, p) for p in parts])) <= 1e-5
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(str(lora))
    prompt = "a photo of dog"
    want = theirs(pipe, prompt)
    got = ours(flux_dir, tmp_path / "with-lora", prompt, "--lora", lora)
    assert (got.int() - want.int()).abs().max() <= 1
    base = theirs(FluxPipeline.from_pretrained(flux_dir), prompt)
    assert (got.int() - base.int()).abs().max() > 1  # the LoRA changed the image
    got = ours(flux_dir, tmp_path / "with-kohya", prompt, "--lora", out / "lora_kohya.safetensors")
    assert (got.int() - want.int()).abs().max() <= 1
    merged = theirs(FluxPipeline.from_pretrained(out / "model"), prompt)
    assert (merged.int() - want.int()).abs().max() <= 1
    got = ours(out / "model.safetensors", tmp_path / "bfl", prompt, "--original-config", out / "model")
    assert (got.int() - want.int()).abs().max() <= 1


def test_kohya_file_read_by_diffusers_converter(flux_dir, instance_dir, tmp_path):
    """Our kohya file in BFL's names, read by diffusers' kohya-Flux converter (through load_lora_weights), draws what
    our diffusers file draws. (Its converter knows the released widths only for the single blocks' linear1, so the
    LoRA here is on the double blocks: --lora-blocks, which names double.N and single.N.)"""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    from minidream.formats.files import read_metadata
    out = tmp_path / "run"
    r = run_cli(*flux_args(flux_dir, instance_dir, out, "--train", "lora", "--lora-targets", "attn-ff",
                           "--lora-blocks", "double.0,double.1", "--lr", 3e-2, "--save-as", "lora-diffusers",
                           "--save-as", "lora-kohya"))
    assert r.exit_code == 0, r.output
    kohya = out / "lora_kohya.safetensors"
    assert {k.split(".")[0].split("_")[4] for k in load_file(str(kohya))} == {"0", "1"}
    assert read_metadata(kohya)["ss_network_module"] == "networks.lora_flux"
    want, got = (FluxPipeline.from_pretrained(flux_dir) for _ in range(2))
    want.load_lora_weights(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    got.load_lora_weights(str(kohya))
    assert (theirs(got, "a photo of dog").int() - theirs(want, "a photo of dog").int()).abs().max() <= 1
    r = run_cli(*flux_args(flux_dir, instance_dir, tmp_path / "bad", "--train", "lora", "--lora-blocks", "single.9"))
    assert r.exit_code != 0 and "--lora-blocks" in r.output and "single.9" in r.output, r.output


def test_resume_is_bit_exact(flux_dir, instance_dir, tmp_path):
    """A run stopped at step 2 and resumed to 4 ends bit-identical to one that ran 4 steps (CLIP LoRA, a token
    learned in CLIP and T5); the resumed command may name the T5 length the run had by default."""
    from safetensors.torch import load_file
    common = ["--train", "lora", "--train-text-encoder", "--train-token", "--train-token-t5", "--checkpoint-every", 2,
              "--save-as", "lora-diffusers"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(*flux_args(flux_dir, instance_dir, full, *common, "--steps", 4)).exit_code == 0
    assert run_cli(*flux_args(flux_dir, instance_dir, cut, *common, "--steps", 2)).exit_code == 0
    r = run_cli(*flux_args(flux_dir, instance_dir, cut, *common, "--steps", 4, "--resume", "latest",
                           "--max-sequence-length", 512))  # [dev]'s default, named: the same run
    assert r.exit_code == 0, r.output
    for name in ("lora/pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = (load_file(d / name) for d in (full, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "t5" in a


def test_t5_tokenizer_reads_a_learned_token_as_transformers_does(tiny_t5_tokenizer, tmp_path):
    """A two-vector token in T5 (--train-token-t5): `<tok>` in a prompt gives the ids T5TokenizerFast gives
    `<s0><s1>` added as diffusers' advanced Flux script adds them, cut and padded alike; saved, it reads back."""
    from transformers import T5TokenizerFast
    from minidream.models.t5_tokenizer import T5Tokenizer
    tiny_t5_tokenizer.save(tmp_path / "tok")
    ref, tok = T5TokenizerFast.from_pretrained(tmp_path / "tok"), T5Tokenizer.from_dir(tmp_path / "tok")
    ref.add_special_tokens({"additional_special_tokens": ["<s0>", "<s1>"]})
    tok.add_vectors("<s0>", 2)
    for prompt in ["a photo of <s0> dog", "<s0> in the snow ", "a  red<s0>dog, a cat " * 4, "a dog"]:
        want = ref(prompt.replace("<s0>", "<s0><s1>"), padding="max_length", max_length=16, truncation=True)
        assert tok([prompt], 16)[0].tolist() == want.input_ids
    tok.save(tmp_path / "saved")
    back = T5Tokenizer.from_dir(tmp_path / "saved")
    assert torch.equal(back(["a photo of <s0> dog"], 16), tok(["a photo of <s0> dog"], 16))


def test_t5_learns_the_token_and_diffusers_draws_it(flux_dir, instance_dir, tmp_path):
    """--train-token --train-token-t5 --token-vectors 2 (diffusers' advanced Flux script's pivotal tuning with
    --enable_t5_ti): the learned-token file holds clip_l and t5 rows, which FluxPipeline's load_textual_inversion
    reads into each encoder (as that script's README loads them) to draw, with the LoRA, what `sample --lora
    --embedding` draws; the merged folder's T5 keeps the base's table size, every row the token does not take
    bit-identical."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*flux_args(flux_dir, instance_dir, out, "--train", "lora", "--train-token", "--train-token-t5",
                           "--token-vectors", 2, "--lr", 3e-2, "--token-lr", 5e-2, "--save-as", "lora-diffusers",
                           "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    rows = load_file(str(out / "learned_embeds.safetensors"))
    assert rows.keys() == {"clip_l", "t5"} and rows["t5"].shape == (2, 96) and rows["clip_l"].shape == (2, 32)
    assert not torch.equal(rows["t5"][0], rows["t5"][1])  # both rows started at "dog"'s mean, and trained
    base_t5 = load_file(str(next((flux_dir / "text_encoder_2").glob("*.safetensors"))))["shared.weight"]
    merged_t5 = load_file(str(next((out / "model" / "text_encoder_2").glob("*.safetensors"))))["shared.weight"]
    first = base_t5.shape[0] - 8  # the tokenizer's size: the token takes the first spare rows
    assert merged_t5.shape == base_t5.shape and torch.equal(merged_t5[first:first + 2], rows["t5"])
    assert torch.equal(merged_t5[:first], base_t5[:first]) and torch.equal(merged_t5[first + 2:], base_t5[first + 2:])
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    tokens = ["<sks>", "<sks>_1"]
    pipe.load_textual_inversion(rows["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["t5"], token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of <sks> dog"
    want = theirs(pipe, prompt)
    got = ours(flux_dir, tmp_path / "ours", prompt, "--lora", out / "lora" / "pytorch_lora_weights.safetensors",
               "--embedding", out / "learned_embeds.safetensors")
    assert (got.int() - want.int()).abs().max() <= 1
    merged = ours(out / "model", tmp_path / "merged", prompt)
    assert (merged.int() - want.int()).abs().max() <= 1


def test_schnell_trains_and_refuses_a_guidance_scale(tmp_path, instance_dir, tiny_tokenizer, tiny_t5_tokenizer):
    schnell = build_flux_pipeline_dir(tmp_path / "schnell", tiny_tokenizer, tiny_t5_tokenizer, dev=False, seed=51)
    for value in (1, 3.5):  # 3.5: [dev]'s default, given
        r = run_cli(*flux_args(schnell, instance_dir, tmp_path / "bad", "--train", "lora", "--guidance-scale", value))
        assert r.exit_code != 0 and "--guidance-scale: Flux.1 [schnell] takes no guidance scale" in r.output, r.output
    r = run_cli(*flux_args(schnell, instance_dir, tmp_path / "run", "--train", "lora", "--save-as", "lora-diffusers"))
    assert r.exit_code == 0, r.output
    import json
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["weighting_scheme"] == "none" and stored["precondition_outputs"] is False


def test_xlabs_lora_draws_what_diffusers_draws(flux_dir, tmp_path):
    """An XLabs Flux LoRA (fused Q/K/V and output pairs per stream, the single blocks' Q/K/V), read by diffusers'
    FluxPipeline.load_lora_weights and by `sample --lora`: the same image."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file
    g, sd = torch.Generator().manual_seed(7), {}
    for i in range(2):
        for name, rows in (("qkv_lora1", 96), ("qkv_lora2", 96), ("proj_lora1", 32), ("proj_lora2", 32)):
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.randn(4, 32, generator=g) * 0.3
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.randn(rows, 4, generator=g) * 0.3
        sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = torch.randn(4, 32, generator=g) * 0.3
        sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = torch.randn(96, 4, generator=g) * 0.3
    save_file(sd, str(tmp_path / "xlabs.safetensors"))
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(str(tmp_path / "xlabs.safetensors"))
    want = theirs(pipe, "a photo of dog")
    got = ours(flux_dir, tmp_path / "ours", "a photo of dog", "--lora", tmp_path / "xlabs.safetensors")
    assert (got.int() - want.int()).abs().max() <= 1
    assert (want.int() - theirs(FluxPipeline.from_pretrained(flux_dir), "a photo of dog").int()).abs().max() > 1


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_kohya_timestep_sampling_is_its_formula(sampling):
    """kohya's --timestep_sampling (flux_train_utils.get_noisy_model_input_and_timesteps): σ drawn from the same
    generator by its formula, t = 1000 σ (flux_shift: μ of the packed latent's (h/2)(w/2) tokens, 0.5 at 256 and
    1.15 at 4096)."""
    import math
    from minidream.models.flow_matching import PRESETS
    density = Density("none", precondition=False, sampling=sampling, sigmoid_scale=1.3, discrete_flow_shift=3.1582)
    got = FlowProcess(PRESETS["flux-dev"], density).draw_timesteps(16, torch.Generator().manual_seed(5), "cpu",
                                                                   (128, 96))
    g = torch.Generator().manual_seed(5)
    sigma = torch.rand(16, generator=g) if sampling == "uniform" else torch.sigmoid(1.3 * torch.randn(16, generator=g))
    if sampling == "shift":
        sigma = sigma * 3.1582 / (1 + 2.1582 * sigma)
    if sampling == "flux_shift":
        m = (1.15 - 0.5) / (4096 - 256)
        mu = 64 * 48 * m + (0.5 - m * 256)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    assert torch.allclose(got, sigma * 1000, rtol=1e-6)


@pytest.mark.parametrize("args, says", [
    (["--train-text-encoder", "--save-as", "single-file"], "the trained text encoder would be written nowhere"),
    (["--sigmoid-scale", 2], "--sigmoid-scale scales --timestep-sampling sigmoid, shift or flux_shift"),
    (["--timestep-sampling", "sigmoid", "--discrete-flow-shift", 2], "is the shift of --timestep-sampling shift"),
    (["--timestep-sampling", "shift", "--discrete-flow-shift", 1e300], "--discrete-flow-shift must be in"),
    (["--lora-blocks", "double.-1"], "Flux: double.N, single.N"),
    (["--class-negative-prompt", "blurry"], "is read by Flux only with true CFG"),
    (["--train-token-t5"], "--train-token-t5 learns the token's T5 row: it needs --train-token"),
    (["--train-token", "--train-token-t5", "--no-t5"], "--train-token-t5 learns a row in T5: drop --no-t5"),
    (["--train-token", "--train-token-t5", "--max-sequence-length", 4], "<sks> falls past T5's 4 tokens"),
    (["--train-token", "--train-token-t5", "--identifier", "pad"], "<pad> (the token --train-token learns) is "
                                                                   "already in this model's vocabulary"),
])
def test_what_a_flux_run_cannot_use_is_refused_before_it_starts(flux_dir, instance_dir, tmp_path, args, says):
    r = run_cli(*flux_args(flux_dir, instance_dir, tmp_path / "run", "--train", "lora", *args))
    assert r.exit_code != 0 and says in r.output, r.output
    assert not (tmp_path / "run" / "run.json").exists()
