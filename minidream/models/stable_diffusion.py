"""The text-to-image model as one object, its named parts, and what differs between model families.

`StableDiffusion` holds what a loader (`formats.loading.load`) returns: tokenizer(s), text encoder(s), UNet, VAE and
the noise-schedule config. The trainer and the samplers use three named parts of it, whatever the family:
- the denoiser (`model.denoiser`; SD's UNet): predicts the noise (or v) from a noisy latent, the timestep and the
  conditioning;
- the conditioning (`encode_text`): the denoiser's keyword arguments for a batch of prompts;
- the forward process (`model.forward_process`; DDPM's q(x_t | x_0) for SD 1.x/2.x/XL): how latents are noised, the
  regression target, the SNR and the timestep draw.

`FAMILIES` has one row per model family: its text encoders and how the other layouts name them (original single
file, kohya LoRA, learned-token files), its conditioning, its forward process and the diffusers pipeline it is.
Code that differs by family looks the row up (`model.family`); a new family is a new row. `PRESETS` names the
architectures minidream implements (the CLI's `--preset` choices).
"""
import copy
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from minidream.models import clip, flux, mmdit, t5, unet, vae
from minidream.models.flow_matching import FlowConfig, FlowProcess
from minidream.models.lora_targets import FLUX_TARGETS, MMDIT_TARGETS, UNET_TARGETS
from minidream.models.noise_schedule import PRESETS as SCHEDULER_PRESETS
from minidream.models.noise_schedule import DDPMProcess, SchedulerConfig
from minidream.models.t5_tokenizer import T5Tokenizer
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet2DConditionModel


# ---------------------------------------------------------------------------------------------
# The families

@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family, and how each layout names it."""
    name: str  # the model's attribute and diffusers folder (its tokenizer: the same with "tokenizer")
    original: str  # its key prefix in the original single-file checkpoint
    openclip: bool  # the original file stores it in OpenCLIP's layout (resblocks, one fused in_proj)
    kohya: str  # the key prefix of its modules in kohya LoRA files
    token_key: str | None = None  # its row's key in a learned-token file (None: the token itself, one encoder)
    unused_last_layer: bool = False  # the original file stores one more layer than the family reads (SD 2.x)


@dataclass(frozen=True)
class Variant:
    """One model of a family, told apart by its prediction type: SD 2.x-base (ε, 512 px) and SD 2.x (v, 768 px) have
    the same tensors."""
    prediction: str  # the scheduler config's prediction_type
    preset: str  # our preset of its architecture (--preset)
    modelspec: str  # its architecture in Stability's model spec (what kohya's files and our exports carry)


# the model spec's spelling of a prediction type
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "flow": "flow"}


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    encoders: tuple[TextEncoderSlot, ...]
    conditioning: Callable  # (model, prompts) -> the denoiser's keyword arguments
    conditioned_on: str  # what that is, in words (`minidream info`)
    pipeline: str  # the diffusers pipeline class (model_index.json)
    tokenizer_repo: str  # a single file has no vocabulary: the hub repo whose tokenizer it uses
    variants: tuple[Variant, ...]  # a single file that does not say which is the only one, or must say it
    forward_process: type = DDPMProcess  # built from the model's noise-schedule config
    denoiser: str = "unet"  # the denoiser's diffusers component name (its folder; LoRA files' prefix)
    denoiser_presets: dict = field(default_factory=lambda: unet.PRESETS)  # its architectures by preset name
    lora_targets: dict = field(default_factory=lambda: UNET_TARGETS)  # --lora-targets' sets in its denoiser; "attn"
    # is also what --train attention trains
    # what `sample` uses when --steps / --guidance are not given: its diffusers pipeline's defaults
    default_steps: int = 50
    default_guidance: float = 7.5
    penultimate: bool = False  # its conditioning reads the CLIPs' penultimate layers by design (no --clip-skip)
    t5: bool = False  # it has a T5 text encoder (--no-t5, --max-sequence-length)
    size_ids: bool = False  # SDXL's micro-conditioning: each image's sizes and crop (`size_ids`) go to the denoiser
    zero_negative: bool = False  # no negative prompt means zero conditioning unless the model says otherwise
    vae_fp32_decode: bool = False  # an fp16 VAE decodes in fp32 when its config says force_upcast (SDXL's overflows)
    kohya_unet_names: str = "diffusers"  # how kohya LoRA files name the UNet's modules: "diffusers" or "original"
    kohya_metadata: tuple = ()  # (key, value) pairs kohya's networks write for this family
    kohya_network: str = "networks.lora"  # the sd-scripts network module its LoRA files name (ss_network_module)
    modelspec_implementation: str = "diffusers"  # the model spec's "implementation" of this family's files
    distilled_guidance: bool = False  # the guidance scale is the denoiser's input, not CFG's (Flux.1 [dev])
    # a flow model's training defaults (--weighting-scheme, --precondition-outputs): its diffusers script's
    flow_training: tuple = ()
    default_lora_targets: str = "attn"  # --lora-targets left out (Flux: diffusers' Flux script's targets)
    bf16_only: bool = False  # its activations overflow fp16 (Flux: black images): its half precision is bf16
    text_in_single_file: bool = True  # its single file holds the text encoders (BFL's: the transformer alone)

    @property
    def single_file_preset(self) -> str | None:
        """A single file's architecture when it does not say: the family's only variant (None: ask)."""
        return self.variants[0].preset if len(self.variants) == 1 else None

    def variant(self, prediction: str, preset: str | None = None) -> Variant | None:
        """The variant of this prediction type: the one of this denoiser preset where several share it (SD3's)."""
        same = [v for v in self.variants if v.prediction == prediction]
        return next((v for v in same if v.preset == preset), same[0] if same else None)


def clip_context(model: "StableDiffusion", prompts: list[str]) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x: the CLIP context (B, 77, C) for the UNet's cross-attention (LDM §3.3)."""
    p = next(model.text_encoder.parameters())
    return {"context": model.text_encoder(model.tokenizer(prompts).to(p.device), skip=model.clip_skip)}


def sdxl_conditioning(model: "StableDiffusion", prompts: list[str]) -> dict[str, torch.Tensor]:
    """SDXL (Podell et al. 2023 §2.1): both encoders' penultimate states side by side (B, 77, 768 + 1280) and the
    second's pooled, projected embedding (B, 1280). The size ids come per image: `size_ids`."""
    p = next(model.text_encoder.parameters())
    states, pooled = [], None
    for _, tok, te in model.text_encoders():
        h, pooled = te.penultimate_and_pooled(tok(prompts).to(p.device))  # the last encoder's pooled is the one used
        states.append(h)
    return {"context": torch.cat(states, dim=-1), "text_embeds": pooled}


def t5_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """T5 v1.1 overflows fp16 (it was trained in bf16): asked for fp16, it stays in fp32."""
    return torch.float32 if dtype == torch.float16 else dtype


def sd3_conditioning(model: "StableDiffusion", prompts: list[str]) -> dict[str, torch.Tensor]:
    """SD3 (Esser et al. 2024, §4 and Fig. 2a): the text sequence is both CLIPs' penultimate states side by side
    (B, 77, 768 + 1280), zero-padded to T5's width, followed by T5's last states (B, L, 4096) — zeros when the model
    runs without T5; the pooled vector is both CLIPs' pooled embeddings side by side (B, 2048)."""
    p = next(model.text_encoder.parameters())
    states, pooled = [], []
    for _, tok, te in model.text_encoders():
        h, v = te.penultimate_and_pooled(tok(prompts).to(p.device))
        states.append(h)
        pooled.append(v)
    clip_states = torch.cat(states, dim=-1)
    width, L = model.denoiser.config.joint_attention_dim, model.max_sequence_length
    if model.text_encoder_3 is None:
        t5_states = clip_states.new_zeros(len(prompts), L, width)
    else:
        t5_param = next(model.text_encoder_3.parameters())
        with torch.autocast(t5_param.device.type, enabled=False):  # in its own dtype, never fp16 (t5_dtype)
            t5_states = model.text_encoder_3(model.tokenizer_3(prompts, L).to(t5_param.device))
        t5_states = t5_states.to(clip_states.device, clip_states.dtype)
    clip_states = torch.nn.functional.pad(clip_states, (0, width - clip_states.shape[-1]))
    return {"context": torch.cat([clip_states, t5_states], dim=1), "pooled": torch.cat(pooled, dim=-1)}


def flux_conditioning(model: "StableDiffusion", prompts: list[str]) -> dict[str, torch.Tensor]:
    """Flux.1: the text sequence is T5's last states (B, L, 4096); the pooled vector CLIP-L's pooled output, the
    final-normed state at the end token, unprojected (B, 768)."""
    p = next(model.text_encoder.parameters())
    _, pooled = model.text_encoder.final_and_pooled(model.tokenizer(prompts).to(p.device))
    t5_param = next(model.text_encoder_3.parameters())
    with torch.autocast(t5_param.device.type, enabled=False):  # in its own dtype, never fp16 (t5_dtype)
        states = model.text_encoder_3(model.tokenizer_3(prompts, model.max_sequence_length).to(t5_param.device))
    return {"context": states.to(pooled.device, pooled.dtype), "pooled": pooled}


# the text encoders of SD 1.x (OpenAI CLIP ViT-L), SD 2.x (OpenCLIP ViT-H, whose original files keep OpenCLIP's
# layout and one layer more than SD reads) and SDXL (both of those kinds: ViT-L and OpenCLIP bigG)
CLIP_L = TextEncoderSlot("text_encoder", original="cond_stage_model.transformer.text_model.", openclip=False,
                         kohya="lora_te_text_model_")
OPENCLIP_H = TextEncoderSlot("text_encoder", original="cond_stage_model.model.", openclip=True,
                             kohya="lora_te_text_model_", unused_last_layer=True)
XL_CLIP_L = TextEncoderSlot("text_encoder", original="conditioner.embedders.0.transformer.text_model.", openclip=False,
                            kohya="lora_te1_text_model_", token_key="clip_l")
XL_OPENCLIP_G = TextEncoderSlot("text_encoder_2", original="conditioner.embedders.1.model.", openclip=True,
                                kohya="lora_te2_text_model_", token_key="clip_g")
# SD3's CLIPs: the same two kinds, both projected, stored in transformers' layout in Stability's single files
SD3_CLIP_L = TextEncoderSlot("text_encoder", original="text_encoders.clip_l.transformer.text_model.", openclip=False,
                             kohya="lora_te1_text_model_", token_key="clip_l")
SD3_CLIP_G = TextEncoderSlot("text_encoder_2", original="text_encoders.clip_g.transformer.text_model.", openclip=False,
                             kohya="lora_te2_text_model_", token_key="clip_g")
# Flux's CLIP-L (unprojected; ComfyUI's clip_l file) and its T5, which diffusers' Flux folder names text_encoder_2
FLUX_CLIP_L = TextEncoderSlot("text_encoder", original="text_encoders.clip_l.transformer.text_model.", openclip=False,
                              kohya="lora_te1_text_model_", token_key="clip_l")

FAMILIES = {
    "sd1": Family("sd1", "SD 1.x", (CLIP_L,), clip_context, conditioned_on="the text encoder's last layer",
                  pipeline="StableDiffusionPipeline", tokenizer_repo="openai/clip-vit-large-patch14",
                  variants=(Variant("epsilon", "sd15", "stable-diffusion-v1"),),
                  kohya_metadata=(("ss_base_model_version", "sd_v1"), ("ss_v2", "False"))),
    # 2.x-base (ε, 512 px) and 2.x-v (768 px) have the same tensors: a single file must say which (its metadata)
    "sd2": Family("sd2", "SD 2.x", (OPENCLIP_H,), clip_context,
                  conditioned_on="the text encoder's last stored layer (OpenCLIP's penultimate)",
                  pipeline="StableDiffusionPipeline", tokenizer_repo="stabilityai/stable-diffusion-2-1",
                  variants=(Variant("epsilon", "sd21-base", "stable-diffusion-v2-512"),
                            Variant("v_prediction", "sd21", "stable-diffusion-v2-768-v")),
                  kohya_metadata=(("ss_base_model_version", "sd_v2"), ("ss_v2", "True"))),
    "sdxl": Family("sdxl", "SDXL", (XL_CLIP_L, XL_OPENCLIP_G), sdxl_conditioning,
                   conditioned_on="both encoders' penultimate states + pooled text + size ids",
                   pipeline="StableDiffusionXLPipeline", tokenizer_repo="stabilityai/stable-diffusion-xl-base-1.0",
                   variants=(Variant("epsilon", "sdxl", "stable-diffusion-xl-v1-base"),), size_ids=True,
                   penultimate=True, zero_negative=True, vae_fp32_decode=True, kohya_unet_names="original",
                   kohya_metadata=(("ss_base_model_version", "sdxl_base_v1-0"),),
                   modelspec_implementation="https://github.com/Stability-AI/generative-models"),
    # SD3 and SD3.5 share the text encoders, VAE and schedule; their MMDiTs tell the variants apart
    "sd3": Family("sd3", "SD 3/3.5", (SD3_CLIP_L, SD3_CLIP_G), sd3_conditioning,
                  conditioned_on="both CLIPs' penultimate states + T5's last states; both CLIPs' pooled",
                  pipeline="StableDiffusion3Pipeline", tokenizer_repo="stabilityai/stable-diffusion-3-medium-diffusers",
                  variants=(Variant("flow", "sd3-medium", "stable-diffusion-3-medium"),
                            Variant("flow", "sd35-medium", "stable-diffusion-3.5-medium"),
                            Variant("flow", "sd35-large", "stable-diffusion-3.5-large")),
                  forward_process=FlowProcess, denoiser="transformer", denoiser_presets=mmdit.PRESETS,
                  lora_targets=MMDIT_TARGETS, penultimate=True, t5=True, default_steps=28, default_guidance=7.0,
                  kohya_unet_names="original", kohya_metadata=(("ss_base_model_version", "sd3"),),
                  kohya_network="networks.lora_sd3", modelspec_implementation="diffusers",
                  flow_training=(("weighting_scheme", "logit_normal"), ("precondition_outputs", True))),
    # dev (guidance-distilled) and schnell (timestep-distilled) share every tensor but the guidance embedder
    "flux": Family("flux", "Flux.1", (FLUX_CLIP_L,), flux_conditioning,
                   conditioned_on="T5's last states; CLIP-L's pooled (+ the guidance scale, [dev])",
                   pipeline="FluxPipeline", tokenizer_repo="black-forest-labs/FLUX.1-dev",
                   variants=(Variant("flow", "flux-dev", "flux-1-dev"), Variant("flow", "flux-schnell",
                                                                                 "flux-1-schnell")),
                   forward_process=FlowProcess, denoiser="transformer", denoiser_presets=flux.PRESETS,
                   lora_targets=FLUX_TARGETS, t5=True, default_steps=28, default_guidance=3.5,
                   kohya_unet_names="original", kohya_metadata=(("ss_base_model_version", "flux1"),),
                   kohya_network="networks.lora_flux", modelspec_implementation="https://github.com/"
                   "black-forest-labs/flux", distilled_guidance=True,
                   flow_training=(("weighting_scheme", "none"), ("precondition_outputs", False)),
                   default_lora_targets="attn-ff", bf16_only=True, text_in_single_file=False),
}


def size_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023 §2.2) for one image: (6,) = original (h, w) of the photo
    before resizing, the crop's top-left (top, left) in the resized photo, and the target (h, w)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def image_conditioning(model: "StableDiffusion", ids: torch.Tensor,
                       guidance: float | None = None) -> dict[str, torch.Tensor]:
    """The denoiser's keyword arguments for each row beside its text, given the rows' size ids (B, 6): SDXL's
    `time_ids`; Flux.1 [dev]'s guidance scale (`guidance`, else the one it trains with: model.guidance)."""
    if model.family.size_ids:
        return {"time_ids": ids}
    if model.guidance_embedded:
        return {"guidance": torch.full((len(ids),), model.guidance if guidance is None else guidance,
                                       device=ids.device)}
    return {}


def encode_text(model: "StableDiffusion", prompts: list[str]) -> dict[str, torch.Tensor]:
    """The denoiser's text conditioning for `prompts`, as keyword arguments of its forward (the family's own); a
    model that remembers its prompts (models/text_memo.py) reads them there, its text encoders no longer needed."""
    memo = getattr(model, "text_memo", None)
    return memo.conditioning(prompts) if memo is not None else model.family.conditioning(model, prompts)


# ---------------------------------------------------------------------------------------------
# The model

@dataclass(frozen=True)
class Preset:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    text_encoder: clip.CLIPConfig
    scheduler: SchedulerConfig
    text_encoder_2: clip.CLIPConfig | None = None  # SDXL's OpenCLIP bigG


# SD 2.x and 2.x-base share every tensor shape; only the UNet's sample size and the prediction type differ.
PRESETS = {name: Preset(unet.PRESETS[name], vae.PRESETS[name],
                        clip.PRESETS["sd21" if name.startswith("sd21") else name], SCHEDULER_PRESETS[name],
                        clip.PRESETS.get(f"{name}-2"))
           for name in ("sd15", "sd21", "sd21-base", "sdxl", "tiny", "tiny-xl")}


def preset_of(config, presets: dict) -> str:
    """The preset a config equals (ignoring the sample size), or 'custom'."""
    def key(c):
        return {f.name: getattr(c, f.name) for f in fields(c) if f.name != "sample_size"}
    return next((name for name, p in presets.items() if key(p) == key(config)), "custom")


def family_of(denoiser: unet.UNetConfig, text_encoder: clip.CLIPConfig) -> Family:
    """The family networks of these configs belong to, for a model built without a loader's word on it: SDXL's UNet
    takes size ids; SD 2.x's text encoder is OpenCLIP's (GELU), SD 1.x's OpenAI's CLIP."""
    if denoiser.add_time_dim is not None:
        return FAMILIES["sdxl"]
    return FAMILIES["sd2" if text_encoder.act == "gelu" else "sd1"]


@dataclass
class StableDiffusion:
    """The parts of a text-to-image model, as loaded."""
    tokenizer: CLIPTokenizer
    text_encoder: clip.CLIPTextModel
    vae: vae.AutoencoderKL
    scheduler: SchedulerConfig | FlowConfig
    source: str
    unet: UNet2DConditionModel | None = None  # SD 1.x/2.x/XL's denoiser
    transformer: mmdit.SD3Transformer2DModel | flux.FluxTransformer2DModel | None = None  # SD3's, Flux's denoiser
    tokenizer_2: CLIPTokenizer | None = None  # SDXL, SD3: OpenCLIP's vocabulary (the same BPE, pads with "!")
    text_encoder_2: clip.CLIPTextModel | None = None  # SDXL, SD3: OpenCLIP ViT-bigG, with text_projection
    tokenizer_3: T5Tokenizer | None = None  # SD3, Flux: T5's SentencePiece vocabulary
    # SD3, Flux (whose diffusers folder names it text_encoder_2): T5 v1.1 XXL (None, SD3: zeros in its place)
    text_encoder_3: t5.T5EncoderModel | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero conditioning, not the empty prompt's
    clip_skip: int = 1  # SD 1.x/2.x: the text encoder layer read, from the end (`with_clip_skip`)
    max_sequence_length: int = 256  # SD3, Flux: T5's tokens per prompt (--max-sequence-length; Flux [dev] 512)
    guidance: float = 3.5  # Flux.1 [dev]: the guidance scale its embedding is fed while training (diffusers')
    family: Family | None = None  # its row of FAMILIES, as the loader found it (None: told by `family_of`)

    def __post_init__(self):
        if self.family is None:
            self.family = family_of(self.unet.config, self.text_encoder.config)

    @property
    def denoiser(self) -> UNet2DConditionModel | mmdit.SD3Transformer2DModel:
        """The network the forward process is inverted with: ε_θ(x_t, t, conditioning) for SD's UNet, the
        velocity v_θ(z_σ, σ, conditioning) for SD3's MMDiT."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def guidance_embedded(self) -> bool:
        """The guidance scale is the denoiser's input (Flux.1 [dev]; [schnell] has none)."""
        return self.family.distilled_guidance and self.denoiser.config.guidance_embeds

    @property
    def pipeline_defaults(self) -> tuple[int, float]:
        """`sample`'s steps and guidance when none are given: its pipeline's (Flux.1 [schnell], timestep-distilled
        and without a guidance input: 4 steps, no guidance)."""
        if self.family.distilled_guidance and not self.guidance_embedded:
            return 4, 0.0
        return self.family.default_steps, self.family.default_guidance

    @property
    def forward_process(self) -> DDPMProcess | FlowProcess:
        return self.family.forward_process(self.scheduler)

    def text_encoders(self) -> list[tuple[str, CLIPTokenizer, clip.CLIPTextModel]]:
        """(checkpoint prefix, tokenizer, encoder) of each text encoder: one for SD 1.x/2.x, two for SDXL."""
        both = [("text_encoder", self.tokenizer, self.text_encoder),
                ("text_encoder_2", self.tokenizer_2, self.text_encoder_2)]
        return [t for t in both if t[2] is not None]

    @property
    def version(self) -> str:
        """Which preset the model matches: sd15, sd21, sd21-base, sdxl, tiny, tiny-xl or custom (a family's
        variants share a UNet: its prediction type tells them apart)."""
        name = preset_of(self.denoiser.config, self.family.denoiser_presets)
        if name in {v.preset for v in self.family.variants} and self.variant is not None:
            return self.variant.preset
        return name

    @property
    def variant(self) -> Variant | None:
        """The family's variant of this prediction type (None: a fine-tune the family never shipped, e.g. a
        v-prediction SD 1.5)."""
        preset = preset_of(self.denoiser.config, self.family.denoiser_presets)
        return self.family.variant(self.scheduler.prediction_type, preset)

    @property
    def modelspec(self) -> dict[str, str]:
        """The model spec's architecture (its variant's, else the family's first: the nearest name there is) and
        prediction type, which ComfyUI, A1111 and our loader read."""
        arch = (self.variant or self.family.variants[0]).modelspec
        return {"modelspec.architecture": arch,
                "modelspec.prediction_type": MODELSPEC_PREDICTION[self.scheduler.prediction_type]}

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell: the VAE's downsampling (8 for SD)."""
        return 2 ** (len(self.vae.config.channels) - 1)

    @property
    def downsampling(self) -> int:
        """Pixels per latent cell at the denoiser's coarsest grid: the VAE's, then the denoiser's downsampling
        (the UNet's stages; the MMDiT's patches). Image sides must be multiples of it."""
        return self.latent_scale * self.denoiser.downsampling

    @property
    def max_side(self) -> int | None:
        """The largest image side the denoiser takes (SD3: its position table's), None when it has no limit."""
        side = getattr(self.denoiser, "max_latent_side", None)
        return None if side is None else side * self.latent_scale

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at: the denoiser's latent size times the VAE's downsampling."""
        return self.denoiser.config.sample_size * self.latent_scale

    def text_networks(self) -> list[torch.nn.Module]:
        """Every text encoder: the CLIP(s) and T5 (SD3)."""
        t5_encoder = [self.text_encoder_3] if self.text_encoder_3 is not None else []
        return [*[te for _, _, te in self.text_encoders()], *t5_encoder]

    def components(self) -> dict[str, torch.nn.Module]:
        """The denoiser and the CLIP text encoder(s) by their diffusers component names (what LoRA files adapt)."""
        return {self.family.denoiser: self.denoiser, **{name: te for name, _, te in self.text_encoders()}}

    def networks(self) -> list[torch.nn.Module]:
        """Every network of the model: text encoder(s), denoiser, VAE."""
        return [*self.text_networks(), self.denoiser, self.vae]

    def to(self, device=None, dtype=None):
        for m in self.networks():
            m.to(device=device, dtype=t5_dtype(dtype) if m is self.text_encoder_3 else dtype)
        return self


def with_clip_skip(model: StableDiffusion, skip: int) -> StableDiffusion:
    """The model conditioned on its text encoder's skip-th layer from the end ("clip skip", numbered as A1111 and
    kohya number it: 1 = the last layer, 2 = the penultimate; each through the final LayerNorm). Community SD 1.x
    models (NovelAI's lineage) were trained on the penultimate layer and are used with 2. SDXL already reads its
    encoders' penultimate layers (its own design), and so does SD3's conditioning: they take none."""
    if skip < 1:
        raise ValueError(f"--clip-skip must be at least 1 (got {skip}); 1 is the last layer, 2 the penultimate")
    if skip == 1:
        return model
    if model.family.penultimate:
        raise ValueError(f"--clip-skip: {model.family.title} already reads its text encoders' penultimate layers; "
                         f"clip skip is for SD 1.x/2.x (drop it)")
    if model.family.distilled_guidance:
        raise ValueError(f"--clip-skip: {model.family.title} reads CLIP-L's pooled output only, which no layer "
                         f"choice changes; clip skip is for SD 1.x/2.x (drop it)")
    layers = len(model.text_encoder.encoder.layers)
    if not 1 <= skip <= layers:
        raise ValueError(f"--clip-skip {skip}: the text encoder has {layers} layers; give 1 to {layers}")
    model.clip_skip = skip
    return model


def with_t5_length(model: StableDiffusion, length: int | None) -> StableDiffusion:
    """The model conditioned on `length` T5 tokens per prompt (None: its default, 256 as diffusers'). Longer prompts
    are cut, shorter ones padded; the padding is attended too, so the length changes the image."""
    if length is None:
        return model
    if not model.family.t5:
        raise ValueError(f"--max-sequence-length: {model.family.title} has no T5 text encoder; it is for SD3 and Flux "
                         f"(drop it)")
    model.max_sequence_length = length
    return model


def random_model(preset: str, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> StableDiffusion:
    """A model at a preset's architecture with random weights (benchmarks, tests: nothing to download)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    p = PRESETS[preset]
    second = {}
    if p.text_encoder_2:
        second = dict(tokenizer_2=copy.deepcopy(tokenizer), text_encoder_2=clip.CLIPTextModel(p.text_encoder_2).eval(),
                      force_zeros_for_empty_prompt=True)
    return StableDiffusion(tokenizer=tokenizer, text_encoder=clip.CLIPTextModel(p.text_encoder).eval(),
                           unet=unet.UNet2DConditionModel(p.unet).eval(), vae=vae.AutoencoderKL(p.vae).eval(),
                           scheduler=p.scheduler, source=f"random:{preset}", **second)
