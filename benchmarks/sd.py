"""Throughput of the whole model against diffusers, same weights and inputs, same process:
the DreamBooth training step (and an ablation of each speed lever), the UNet alone, sampling, the VAE.

Random weights at the real architectures (nothing to download); `--smoke` runs the tiny preset (tiny-xl for
`--preset sdxl`) on CPU with one repeat, to keep the code alive in CI — its numbers mean nothing and are never
reported. SDXL runs at 1024 px, the others at 512; its step benchmark trains LoRA and the attention projections
(the whole 2.6 B UNet with fp32 AdamW and a diffusers twin does not fit beside it on one 80 GB card).
"""
import copy
import tempfile

import torch

from .common import count_flops, peak_memory, peak_tflops, timeit, write
from minidream.models.attention import set_attention_backend
from minidream.formats.configs import clip_config_json, unet_config_json, vae_config_json
from minidream.models.stable_diffusion import encode_text, random_model, image_conditioning, size_ids
from minidream.sampling.pipeline import SamplingParams, generate
from minidream.models.tokenizer import train_bpe
from minidream.training.step import training_step
from minidream.training.trainable import select_trainable

PROMPTS = ["a photo of sks dog", "a photo of dog", "a photo of a dog on the beach"]


def setup(preset: str, device):
    tok = train_bpe(PROMPTS * 4, 300)
    ours = random_model(preset, tokenizer=tok, seed=0)
    ours.to(device)
    return ours, 16 if preset.startswith("tiny") else 1024 if preset == "sdxl" else 512


def latent_side(ours, res: int) -> int:
    return res // 2 ** (len(ours.vae.config.channels) - 1)


def conditioning(ours, prompts: list[str], res: int, device) -> dict:
    """Our UNet's keyword arguments for these prompts (SDXL: + the size ids of an uncropped res x res image)."""
    with torch.no_grad():
        cond = encode_text(ours, prompts)
    ids = size_ids((res, res), (0, 0), (res, res)).expand(len(prompts), 6).to(device)
    return {**cond, **image_conditioning(ours, ids)}


def diffusers_kwargs(cond: dict) -> dict:
    """The same conditioning as diffusers' UNet2DConditionModel takes it."""
    extra = {k: v for k, v in cond.items() if k != "context"}
    return {"encoder_hidden_states": cond["context"], **({"added_cond_kwargs": extra} if extra else {})}


def diffusers_twins(ours, device, dtype=torch.float32):
    """diffusers / transformers modules holding exactly our weights (the key names are the same): UNet, VAE and
    the text encoder(s)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config_json(ours.unet.config).items()
                                   if not k.startswith("_")})
    unet.load_state_dict(ours.unet.state_dict())
    vae = AutoencoderKL(**{k: v for k, v in vae_config_json(ours.vae.config).items() if not k.startswith("_")})
    vae.load_state_dict(ours.vae.state_dict())
    texts = []
    for _, tok, te in ours.text_encoders():
        c = clip_config_json(te.config, tok)
        cls = CLIPTextModelWithProjection if te.config.projection_dim else CLIPTextModel
        text = cls(CLIPTextConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")}))
        text.load_state_dict({(k if k.startswith("text_projection") else f"text_model.{k}"): v
                              for k, v in te.state_dict().items()}, strict=False)
        texts.append(text.to(device, dtype))
    return unet.to(device, dtype), vae.to(device, dtype), *texts


# ---------------------------------------------------------------------------------------------
# The DreamBooth step: 1 instance + 1 prior image, bf16 autocast, AdamW.

def our_step(ours, mode: str, device, res: int, cache_latents: bool = True, fused: bool = True,
             channels_last: bool = False, attention: str = "sdpa", compile_unet: bool = False,
             checkpointing: bool = False):
    m = copy.deepcopy(ours)
    params = select_trainable(m, mode).params()
    set_attention_backend(m.unet, attention)
    m.unet.set_gradient_checkpointing(checkpointing).train()
    if channels_last:
        m.unet.to(memory_format=torch.channels_last)
    unet = torch.compile(m.unet) if compile_unet else m.unet
    opt = torch.optim.AdamW(params, lr=1e-6, **({"fused": True} if fused and device == "cuda" else {"foreach": True}))
    process = m.forward_process
    g = torch.Generator(device).manual_seed(0)  # on the GPU: no host-to-device copy (and sync) per step
    half = torch.bfloat16 if device == "cuda" else None
    cond = conditioning(m, list(PROMPTS[:2]), res, device)
    with torch.no_grad():
        images = torch.randn(2, 3, res, res, device=device)
        mean, logvar = m.vae.encode(images)

    def step():
        with torch.autocast(device, dtype=half, enabled=half is not None):
            if cache_latents:
                lat = m.vae.latents(mean, logvar, torch.randn_like(mean))
            else:
                with torch.no_grad():
                    lat = m.vae.sample(images)
            if channels_last:
                lat = lat.contiguous(memory_format=torch.channels_last)
            loss, _, _ = training_step(unet, process, lat.float(), cond, 1, 1.0, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, m


def bench_step(ours, device, res, smoke, warmup, repeat):
    """The trainer's own step (benchmarks/step.py: prepare → Stepper) eager, --compile on, --compile graphs (CUDA)
    against diffusers' script step eager and compiled, in interleaved rounds, every mode, cached and uncached
    latents. --smoke: eager variants only, two rounds of one step."""
    from . import step as trainer_step
    from minidream.formats.diffusers_layout import save_pretrained
    modes = ("lora", "attention") if ours.version == "sdxl" else ("unet", "attention", "lora")
    reference = has_reference()
    if not reference:
        trainer_step.log("diffusers/transformers/peft are not installed: the step is timed for ours alone")
    variants = trainer_step.available(device, reference, compiled=not smoke)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)  # the trainer loads its base from a folder, as `minidream train` does
        rows = trainer_step.bench(d, device, res, modes, variants, rounds=2 if smoke else 5,
                                  per_round=1 if smoke else max(1, repeat // 5), warmup=1 if smoke else warmup,
                                  say=trainer_step.log)
    for r in rows:
        r["smoke"] = smoke
    return rows


def bench_levers(ours, device, res, smoke, warmup, repeat):
    """Each speed lever alone on the whole-UNet step (cached latents), so users see which flags matter."""
    variants = {"baseline (sdpa, foreach AdamW)": dict(fused=False), "fused AdamW": dict(fused=True),
                "channels_last": dict(fused=False, channels_last=True),
                "triton attention": dict(fused=False, attention="triton"),
                "gradient checkpointing": dict(fused=False, checkpointing=True),
                "all: fused AdamW + channels_last + triton": dict(fused=True, channels_last=True, attention="triton")}
    if device == "cuda":
        variants["torch.compile"] = dict(fused=False, compile_unet=True)
        variants["all + torch.compile"] = dict(fused=True, channels_last=True, attention="triton", compile_unet=True)
    else:  # the Triton interpreter is a correctness tool; timing it through a whole UNet only costs CI minutes
        variants = {k: v for k, v in variants.items() if v.get("attention") != "triton"}
    rows = []
    for name, kw in variants.items():
        try:
            fn, m = our_step(ours, "unet", device, res, **kw)
            r = {**timeit(fn, device, warmup if "compile" not in name else warmup + 3, repeat),
                 "peak_bytes": peak_memory(fn, device)}
            del m
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        rows.append({"benchmark": "lever", "variant": name, "smoke": smoke, **r})
        print(name, r.get("median_ms"))
    return rows


# ---------------------------------------------------------------------------------------------

def has_reference() -> bool:
    """diffusers, transformers and peft importable: the reference rows run (else ours alone, said once)."""
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def unet_variants(ours, device, smoke) -> dict:
    """Our UNet eager and, on CUDA, compiled as `--compile on` and `--compile graphs` compile it."""
    from minidream.models.compile import compile_network
    nets = {"ours": ("off", ours.unet)}
    if device == "cuda" and not smoke:
        for mode in ("on", "graphs"):
            nets[f"ours --compile {mode}"] = (mode, compile_network(copy.deepcopy(ours.unet), mode))
    return nets


def bench_unet(ours, device, res, smoke, warmup, repeat):
    """Forward and forward+backward per batch size, FLOPs counted by torch, MFU against the GPU's bf16 peak: each
    of our variants (unet_variants) and diffusers' UNet with the same weights."""
    from minidream.models.compile import step_begins
    ref_unet = diffusers_twins(ours, device)[0] if has_reference() else None
    nets = unet_variants(ours, device, smoke)
    rows = []
    h = latent_side(ours, res)
    peak = peak_tflops(device)
    half = torch.bfloat16 if device == "cuda" else None
    for B in ((1, 2) if smoke else (1, 2, 4) if ours.family.name == "sdxl" else (1, 2, 8)):
        x = torch.randn(B, 4, h, h, device=device)
        cond = conditioning(ours, [PROMPTS[2]] * B, res, device)
        cond["context"] = torch.randn(B, 77, ours.unet.config.context_dim, device=device)
        t = torch.full((B,), 500, device=device)
        for kind in ("forward", "forward_backward"):
            def call(net, mode="off", ref=False):
                net.zero_grad(set_to_none=True)  # CUDA graphs: gradients live in the graph's memory until the next
                step_begins(mode)  # replay, which may now overwrite them (as the trainer's step does)
                with torch.autocast(device, dtype=half, enabled=half is not None):
                    out = net(x, t, **diffusers_kwargs(cond)).sample if ref else net(x, t, **cond)
                if kind == "forward_backward":
                    out.float().square().mean().backward()
            for net in [n for _, n in nets.values()] + ([ref_unet] if ref_unet is not None else []):
                net.requires_grad_(kind == "forward_backward")
            with torch.set_grad_enabled(kind == "forward_backward"):
                flops = count_flops(lambda: call(ours.unet))
                r = {"benchmark": "unet", "batch": B, "kind": kind, "flops": flops, "smoke": smoke}
                for name, (mode, net) in nets.items():
                    r[name] = timeit(lambda: call(net, mode), device, warmup + 2 * (mode != "off"), repeat)
                if ref_unet is not None:
                    r["diffusers"] = timeit(lambda: call(ref_unet, ref=True), device, warmup, repeat)
            for side in [*nets, "diffusers"][:len(nets) + (ref_unet is not None)]:
                r[side]["tflops"] = flops / (r[side]["median_ms"] * 1e-3) / 1e12
                if peak:
                    r[side]["mfu"] = r[side]["tflops"] / peak
            if ref_unet is not None:
                r["speedup"] = r["diffusers"]["median_ms"] / r["ours"]["median_ms"]
            rows.append(r)
    ours.unet.requires_grad_(False)
    return rows


def diffusers_pipeline(ours, device, dtype):
    """diffusers' pipeline (SD or SDXL) holding our weights, with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    unet, vae, *texts = diffusers_twins(ours, device, dtype)
    toks = []
    for _, t, _ in ours.text_encoders():
        with tempfile.TemporaryDirectory() as d:
            t.save(d)
            toks.append(CLIPTokenizer.from_pretrained(d))
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    # both pipelines decode the VAE in fp32 only under fp16 (force_upcast); bf16 here decodes in bf16 on both sides
    if ours.family.pipeline == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=unet, scheduler=ddim, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=toks[0], unet=unet, scheduler=ddim,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sampling(ours, device, res, smoke, warmup, repeat):
    """50 DDIM steps with CFG, one image: ours (and `sample --compile on` on CUDA) against diffusers' pipeline."""
    from minidream.models.compile import compile_network
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = 2 if smoke else 50
    params = SamplingParams(steps=steps, guidance=7.5, sampler="ddim", height=res, width=res)  # DDIM on both sides
    sides = {"ours": copy.deepcopy(ours).to(dtype=dtype)}
    if device == "cuda" and not smoke:
        sides["ours --compile on"] = copy.deepcopy(sides["ours"])
        compile_network(sides["ours --compile on"].unet, "on")
    fns = {name: (lambda m=m: generate(m, [PROMPTS[2]], params, progress=False,
                                       generator=torch.Generator().manual_seed(0))) for name, m in sides.items()}
    if has_reference():
        pipe = diffusers_pipeline(ours, device, dtype)
        fns["diffusers"] = lambda: pipe(PROMPTS[2], num_inference_steps=steps, guidance_scale=7.5, height=res,
                                        width=res, generator=torch.Generator().manual_seed(0), output_type="np")
    r = {"benchmark": "sampling", "steps": steps, "size": res, "dtype": str(dtype).removeprefix("torch."),
         "smoke": smoke}
    for name, fn in fns.items():
        r[name] = timeit(fn, device, min(warmup, 2) + ("compile" in name), max(1, repeat // 5))
        r[name]["it_per_s"] = steps / (r[name]["median_ms"] * 1e-3)
    if "diffusers" in r:
        r["speedup"] = r["diffusers"]["median_ms"] / r["ours"]["median_ms"]
    return [r]


def bench_vae(ours, device, res, smoke, warmup, repeat):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref_vae = diffusers_twins(ours, device, dtype)[1] if has_reference() else None
    vae = copy.deepcopy(ours.vae).to(dtype=dtype)
    rows = []
    for B in ((1,) if smoke else (1, 4)):
        x = torch.randn(B, 3, res, res, device=device, dtype=dtype)
        z = torch.randn(B, 4, latent_side(ours, res), latent_side(ours, res), device=device, dtype=dtype)
        with torch.no_grad():
            for kind, fns in (("encode", {"ours": lambda: vae.encode(x), "diffusers": lambda: ref_vae.encode(x)}),
                              ("decode", {"ours": lambda: vae.decode(z), "diffusers": lambda: ref_vae.decode(z)})):
                r = {"benchmark": "vae", "kind": kind, "batch": B, "smoke": smoke}
                for side in ("ours", "diffusers")[:1 + (ref_vae is not None)]:
                    r[side] = timeit(fns[side], device, warmup, repeat)
                    r[side]["images_per_s"] = B / (r[side]["median_ms"] * 1e-3)
                if ref_vae is not None:
                    r["speedup"] = r["diffusers"]["median_ms"] / r["ours"]["median_ms"]
                rows.append(r)
    return rows


SUITE = {"step": bench_step, "levers": bench_levers, "unet": bench_unet, "sampling": bench_sampling, "vae": bench_vae}


def run(preset: str = "sd15", only: list[str] | None = None, smoke: bool = False, warmup: int = 5, repeat: int = 20,
        out=None):
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if smoke:
        preset, warmup, repeat = "tiny-xl" if "xl" in preset else "tiny", 1, 2
    ours, res = setup(preset, device)
    paths = []
    for name, fn in SUITE.items():
        if only and name not in only:
            continue
        rows = fn(ours, device, res, smoke, warmup, repeat)
        paths.append(write(f"{name}-{preset}", device, rows, **({"out": out} if out else {})))
    return paths
