"""DreamBooth on SD3: the rectified-flow objective of diffusers' train_dreambooth_lora_sd3.py (its σ densities, loss
weightings and preconditioning) with the same loss and gradients, LoRA on diffusers' SD3 targets, the exports read
back by diffusers (the LoRA file through load_lora_weights, the folder through from_pretrained), bit-exact resume, and
the options that belong to the other forward process refused by name."""
import pytest
import torch

from minidream.formats import loading
from minidream.models.flow_matching import Density, FlowProcess
from minidream.models.stable_diffusion import encode_text
from minidream.training.step import dreambooth_loss
from tests.conftest import assert_same_loss_and_grads, build_sd3_pipeline_dir, max_rel_err
from tests.test_adapters import ours, theirs
from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory, tiny_tokenizer, tiny_t5_tokenizer):
    return build_sd3_pipeline_dir(tmp_path_factory.mktemp("sd35m"), tiny_tokenizer, tiny_t5_tokenizer, "sd35-medium",
                                  seed=40)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
def test_timestep_draws_match_diffusers(scheme):
    """The same generator gives the same training timesteps as compute_density_for_timestep_sampling indexing the
    shifted FlowMatchEulerDiscreteScheduler's timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from minidream.models.flow_matching import FlowConfig
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(3))
    want = sched.timesteps[(u * 1000).long()]
    process = FlowProcess(FlowConfig(shift=3.0), Density(scheme, 0.3, 1.2, 1.29))
    got = process.draw_timesteps(64, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme, precondition", [("logit_normal", True), ("sigma_sqrt", False), ("cosmap", True)])
def test_one_step_matches_diffusers_sd3_loss_and_gradients(sd3_dir, scheme, precondition):
    """Same latents, noise and timesteps: our loss parts and MMDiT gradients equal those of diffusers' transformer
    with train_dreambooth_lora_sd3.py's objective (z = (1-σ)x + σn; x̂ = z - σv against x when preconditioned, else
    v against n - x; compute_loss_weighting_for_sd3 per example; instance + λ·prior)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    ref = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    m = loading.load(str(sd3_dir))
    ref.transformer.requires_grad_(True)
    m.denoiser.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    t = FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps[torch.tensor([5, 300, 650, 990])]
    prompts = ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    sigma = (t / 1000).view(-1, 1, 1, 1)
    noisy = (1 - sigma) * x + sigma * noise
    with torch.no_grad():
        ctx, _, pooled, _ = ref.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    pred = ref.transformer(noisy, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    pred, target = (pred * -sigma + noisy, x) if precondition else (pred, noise - x)
    w = compute_loss_weighting_for_sd3(scheme, sigma)
    per_example = (w * (pred - target) ** 2).reshape(4, -1).mean(1)
    ref_inst, ref_prior = per_example[:2].mean(), per_example[2:].mean()
    (ref_inst + 0.7 * ref_prior).backward()

    process = FlowProcess(m.scheduler, Density(scheme, precondition=precondition))
    with torch.no_grad():
        cond = encode_text(m, prompts)
    z = process.add_noise(x, noise, t)
    out = process.output(m.denoiser(z, t, **cond), z, t)
    loss, inst, prior = dreambooth_loss(out, process.target(x, noise, t), 2, 0.7, process.loss_weights(t))
    loss.backward()
    assert_same_loss_and_grads((inst, prior), (ref_inst, ref_prior), m.denoiser, ref.transformer)


def test_lora_exports_give_diffusers_images(sd3_dir, instance_dir, tmp_path):
    """train --train lora --train-text-encoder --train-token --train-token-t5 on SD3.5 Medium's layout: the adapters
    sit on diffusers' SD3 targets and both CLIPs'; the diffusers LoRA file loads in
    StableDiffusion3Pipeline.load_lora_weights and draws the image `sample --lora` draws, and so does the kohya file;
    the merged folder (the token a row of both CLIPs and of T5) loads in StableDiffusion3Pipeline.from_pretrained and
    draws what `sample --lora --embedding` draws, and so does the single file (T5 in it the base's, bit-identical)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*train_args(sd3_dir, instance_dir, out, "--train", "lora", "--train-text-encoder", "--train-token",
                            "--train-token-t5", "--lr", 3e-2, "--token-lr", 0.1, "--save-as", "lora-diffusers",
                            "--save-as", "diffusers",
                            "--save-as", "single-file", "--save-as", "lora-kohya"))
    assert r.exit_code == 0, r.output
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    keys = load_file(str(lora))
    denoiser = [k for k in keys if k.startswith("transformer.")]
    targets = {k.split(".lora_")[0].split(".attn.")[1] for k in denoiser}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert all(k.startswith("transformer.transformer_blocks.") for k in denoiser)
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    emb = load_file(str(out / "learned_embeds.safetensors"))
    assert set(emb) == {"clip_l", "clip_g", "t5"} and emb["clip_l"].shape == (1, 32) and emb["t5"].shape == (1, 96)
    single, base_t5 = load_file(str(out / "model.safetensors")), load_file(str(next(
        (sd3_dir / "text_encoder_3").glob("*.safetensors"))))["shared.weight"]
    assert torch.equal(single["text_encoders.t5xxl.transformer.shared.weight"], base_t5)  # the token is elsewhere
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.load_lora_weights(str(lora))
    want = theirs(pipe, "a photo of dog")
    got = ours(sd3_dir, tmp_path / "with-lora", "a photo of dog", "--lora", lora)
    assert (got.int() - want.int()).abs().max() <= 1
    kohya = ours(sd3_dir, tmp_path / "with-kohya", "a photo of dog", "--lora", out / "lora_kohya.safetensors")
    assert (kohya.int() - want.int()).abs().max() <= 1  # kohya's layout (tests/test_sd3_comfyui.py), the same
    from minidream.formats.files import read_metadata
    assert read_metadata(out / "lora_kohya.safetensors")["ss_network_module"] == "networks.lora_sd3"
    base = theirs(StableDiffusion3Pipeline.from_pretrained(sd3_dir), "a photo of dog")
    assert (got.int() - base.int()).abs().max() > 1  # the LoRA changed the image
    prompt = "a photo of <sks> dog"
    merged = theirs(StableDiffusion3Pipeline.from_pretrained(out / "model"), prompt)
    got = ours(sd3_dir, tmp_path / "with-token", prompt, "--lora", lora, "--embedding",
               out / "learned_embeds.safetensors")
    assert (got.int() - merged.int()).abs().max() <= 1
    # Stability's single-file layout, its architecture in its metadata, the base's vocabulary (+ the token file)
    got = ours(out / "model.safetensors", tmp_path / "single", prompt, "--tokenizer", sd3_dir, "--embedding",
               out / "learned_embeds.safetensors")
    assert (got.int() - merged.int()).abs().max() <= 1


@pytest.mark.parametrize("mode, changed", [
    ("unet", lambda k: True),
    ("attention", lambda k: ".attn." in k and k.rsplit(".", 2)[-2] in {
        "to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}),
])
def test_each_mode_trains_what_it_names(sd3_dir, instance_dir, tmp_path, mode, changed):
    """--train unet: every MMDiT tensor moves; attention: exactly both streams' Q/K/V/out of the joint attentions;
    the text encoders, T5 and the VAE are written back bit-identical."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*train_args(sd3_dir, instance_dir, out, "--train", mode, "--lr", 1e-2, "--save-as", "diffusers"))
    assert r.exit_code == 0, r.output
    for comp in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        stem = "model" if comp.startswith("text") else "diffusion_pytorch_model"
        a, b = (load_file(str(d / comp / f"{stem}.safetensors")) for d in (sd3_dir, out / "model"))
        moved = {k for k in a if not torch.equal(a[k], b[k])}
        if comp != "transformer":
            assert not moved, comp
            continue
        want = {k for k in a if changed(k) and not k.startswith("pos_embed.pos_embed")}
        assert moved == want, sorted(moved ^ want)[:5]


def test_lora_blocks_take_block_indices(sd3_dir, instance_dir, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    r = run_cli(*train_args(sd3_dir, instance_dir, out, "--train", "lora", "--lora-blocks", "0,2", "--save-as",
                            "lora-diffusers"))
    assert r.exit_code == 0, r.output
    keys = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[2] for k in keys} == {"0", "2"}
    r = run_cli(*train_args(sd3_dir, instance_dir, tmp_path / "bad", "--train", "lora", "--lora-blocks", "7"))
    assert r.exit_code != 0 and "--lora-blocks 7" in r.output, r.output


def test_resume_is_bit_exact(sd3_dir, instance_dir, tmp_path):
    """A run stopped at step 2 and resumed to 4 ends bit-identical to one that ran 4 steps (the σ draws included)."""
    from safetensors.torch import load_file
    common = ["--train", "lora", "--train-token", "--checkpoint-every", 2, "--save-as", "lora-diffusers",
              "--weighting-scheme", "mode"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(*train_args(sd3_dir, instance_dir, full, *common, "--steps", 4)).exit_code == 0
    assert run_cli(*train_args(sd3_dir, instance_dir, cut, *common, "--steps", 2)).exit_code == 0
    r = run_cli(*train_args(sd3_dir, instance_dir, cut, *common, "--steps", 4, "--resume", "latest"))
    assert r.exit_code == 0, r.output
    a, b = (load_file(d / "lora" / "pytorch_lora_weights.safetensors") for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (load_file(d / "learned_embeds.safetensors") for d in (full, cut))
    assert all(torch.equal(ea[k], eb[k]) for k in ("clip_l", "clip_g"))


@pytest.mark.parametrize("model, flag, value, says", [
    ("sd3", "--snr-gamma", 5, "--snr-gamma: SD 3/3.5 is trained by rectified flow"),
    ("sd3", "--noise-offset", 0.05, "--noise-offset: SD 3/3.5 is trained by rectified flow"),
    ("sd1", "--weighting-scheme", "mode", "--weighting-scheme: SD 1.x is trained by DDPM"),
    ("sd1", "--no-t5", None, "--no-t5:"),
    ("sd1", "--max-sequence-length", 77, "--max-sequence-length: SD 1.x has no T5 text encoder"),
    ("sd1", "--text-encoders", "clip_l.safetensors", "--text-encoders: "),
    ("sd1", "--train-token-t5", ["--train-token"], "--train-token-t5: this SD 1.x model has no T5 text encoder"),
    ("sd3", "--resolution", 72, "--resolution 72: this model's position table reaches 64 px a side"),
    ("sd3", "--aspect-buckets", ["--max-aspect", 4, "--resolution", 48], "its widest --aspect-buckets shape"),
    ("sd3", "--clip-skip", 2, "--clip-skip: SD 3/3.5 already reads"),
])
def test_options_of_other_families_are_refused_by_name(sd3_dir, sd1_dir, instance_dir, tmp_path, model, flag, value,
                                                       says):
    out = tmp_path / "run"
    folder = sd3_dir if model == "sd3" else sd1_dir
    values = [] if value is None else value if isinstance(value, list) else [value]
    r = run_cli(*train_args(folder, instance_dir, out, flag, *values))
    assert r.exit_code != 0 and says in r.output, r.output
    assert "Traceback" not in r.output


def test_t5_runs_once_per_prompt_while_the_clips_train(sd3_dir):
    """While the CLIPs (or a token) train, each step re-encodes its prompts; T5 is frozen and each prompt's T5
    states are kept (RowMemo): T5 runs once per distinct prompt, each alone, and the conditioning is encode_text's."""
    from minidream.training.batches import RowMemo, TextConditioning
    from minidream.training.trainable import Trainable
    m, fresh = loading.load(str(sd3_dir)), loading.load(str(sd3_dir))
    clip_weight = m.text_encoder.encoder.layers[0].self_attn.q_proj.weight
    cfg = type("C", (), {"text_encoder_steps": 0})()
    text = TextConditioning(m, cfg, Trainable([], [("q", clip_weight.requires_grad_(True))], []),
                            ["a photo of sks dog", "a photo of dog"])
    assert isinstance(m.text_encoder_3, RowMemo)
    calls = []
    m.text_encoder_3.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    prompts = ["a photo of sks dog", "a photo of dog", "a photo of sks dog on grass"]
    for step in range(3):
        got = text(step, prompts)
    assert calls == [1, 1, 1]
    with torch.no_grad():
        want = encode_text(fresh, prompts)
    assert max_rel_err(got["context"], want["context"]) <= 1e-5 and max_rel_err(got["pooled"], want["pooled"]) <= 1e-5
