"""SD3 files as ComfyUI users keep them: the text encoders as separate files (clip_l, clip_g, t5xxl) beside a
single file without them, and LoRA files in kohya's layout (sd-scripts' networks/lora_sd3.py, which ComfyUI reads):
modules under the original MMDiT's names (`lora_unet_joint_blocks_0_x_block_attn_qkv`, Q/K/V fused), the CLIPs as
`lora_te1_`, `lora_te2_`, T5 as `lora_te3_`. The reference is what such a file means: each pair merged into the
original checkpoint's weight (W += α/r · up·down, as ComfyUI merges it), read by diffusers' SD3 single-file
converter, and the text encoders' pairs merged into transformers' modules; `sample --lora` must give that model and
its image."""
from dataclasses import replace

import pytest
import torch

from minidream.formats import loading
from minidream.formats.lora_files import apply_loras
from minidream.formats.sd3_single_file import DIT, to_sd3_single_file
from minidream.sampling.pipeline import SamplingParams, generate
from tests.conftest import max_rel_err
from tests.test_sd3 import PROMPTS, pipes  # noqa: F401 (pipes is a fixture)


def random_kohya_lora(sd: dict, ref, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pair on every linear layer and convolution of the single file's MMDiT (fused Q/K/V, attn2, the adaLN
    modulations, the embedders, the patch convolution), and on some of each text encoder's."""
    g = torch.Generator().manual_seed(seed)
    weights = {k.removeprefix(DIT).removesuffix(".weight"): v for k, v in sd.items()
               if k.startswith(DIT) and k.endswith(".weight") and v.dim() in (2, 4)}
    modules = {"lora_unet_" + name.replace(".", "_"): w for name, w in weights.items()}
    encoders = {"lora_te1_": ref.text_encoder, "lora_te2_": ref.text_encoder_2, "lora_te3_": ref.text_encoder_3}
    for prefix, net in encoders.items():
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".0." in name or name.endswith("wo")):
                modules[prefix + name.replace(".", "_")] = mod.weight
    lora = {}
    for key, w in modules.items():
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        lora[f"{key}.lora_down.weight"] = down
        lora[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=g) * 0.3
        lora[f"{key}.alpha"] = torch.tensor(float(rank) * 0.5)
    return lora


def merged_as_comfyui(weight: torch.Tensor, lora: dict, key: str) -> torch.Tensor:
    down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
    scale = float(lora[f"{key}.alpha"]) / down.shape[0]
    return weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def reference_pipeline(ref, sd: dict, lora: dict, folder, tmp_path):
    """The pipeline with the file merged: the MMDiT through Stability's layout and diffusers' converter."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file
    merged = dict(sd)
    for k, w in sd.items():
        key = "lora_unet_" + k.removeprefix(DIT).removesuffix(".weight").replace(".", "_")
        if k.startswith(DIT) and f"{key}.alpha" in lora:
            merged[k] = merged_as_comfyui(w, lora, key)
    f = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in merged.items() if k.startswith(DIT)}, f)
    transformer = SD3Transformer2DModel.from_single_file(str(f), subfolder="transformer", config=str(folder),
                                                         local_files_only=True)
    parts = {**ref.components, "transformer": transformer}
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
    for comp, prefix in prefixes.items():
        net = type(ref.components[comp])(ref.components[comp].config).eval()  # T5's dropout off
        net.load_state_dict(ref.components[comp].state_dict())
        with torch.no_grad():
            for name, mod in net.named_modules():
                key = prefix + name.replace(".", "_")
                if f"{key}.alpha" in lora:
                    mod.weight.copy_(merged_as_comfyui(mod.weight, lora, key))
        parts[comp] = net
    pipe = type(ref)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_kohya_sd3_lora_reads_as_comfyui_merges_it(pipes, tmp_path):  # noqa: F811
    from safetensors.torch import save_file
    ref, m = pipes
    folder = m.source
    sd = to_sd3_single_file(m)
    lora = random_kohya_lora(sd, ref)
    assert any("attn_qkv" in k for k in lora) and any("final_layer_adaLN" in k for k in lora)
    f = tmp_path / "kohya.safetensors"
    save_file(lora, f)
    theirs = reference_pipeline(ref, sd, lora, folder, tmp_path)
    ours = apply_loras(loading.load(str(folder)), [(f, 1.0)])
    want = theirs.transformer.state_dict()
    for k, v in ours.denoiser.state_dict().items():
        assert max_rel_err(v, want[k]) <= 1e-5, k
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        want = theirs.components[comp].state_dict()
        for k, v in getattr(ours, comp).state_dict().items():
            assert max_rel_err(v, want[k if k in want else f"text_model.{k}"]) <= 1e-5, (comp, k)
    image = theirs(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    image = torch.from_numpy((image * 255).round()).to(torch.uint8)
    got = generate(ours, PROMPTS, SamplingParams(steps=3, guidance=4.0, height=16, width=16),
                   generator=torch.Generator().manual_seed(0), progress=False)
    assert (got.int() - image.int()).abs().max() <= 1


@pytest.mark.parametrize("targets, dora", [("attn", False), ("all", False), ("all", True), ("attn", "mixed")])
def test_kohya_sd3_lora_we_write_merges_to_our_model(pipes, tmp_path, targets, dora):  # noqa: F811
    """Adapters on diffusers' SD3 targets (Q, K, V separately; `all`: the adaLN modulations too), written in
    kohya's layout: merged into Stability's single file as ComfyUI merges it, diffusers' converter gives our merged
    MMDiT; read back by `sample --lora`, the same weights (DoRA too, and DoRA beside plain LoRA in one fused Q/K/V)."""
    from safetensors.torch import save_file
    from minidream.formats.lora_export import kohya_lora_state_dict
    from minidream.models import lora as lora_lib
    from minidream.models.lora_targets import MMDIT_TARGETS
    ref, m = pipes
    folder = m.source
    adapted = loading.load(str(folder))
    names = [n for n, mod in adapted.denoiser.named_modules()
             if isinstance(mod, torch.nn.Linear) and MMDIT_TARGETS[targets].pattern.search(n)]
    spec = lora_lib.AdapterSpec(rank=2, alpha=3.0, dora=bool(dora))
    adapters = lora_lib.add_lora(adapted.denoiser, names[::2], spec)  # "mixed": Q and V DoRA, K plain, ...
    adapters |= lora_lib.add_lora(adapted.denoiser, names[1::2], replace(spec, dora=dora is True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.2)
            if a.magnitude is not None:
                a.magnitude.mul_(1 + 0.1 * torch.rand(a.magnitude.shape, generator=g))
    lora = kohya_lora_state_dict(adapted)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in lora
    assert not any("to_q" in k for k in lora)
    f = tmp_path / "ours_kohya.safetensors"
    save_file(lora, f)
    lora_lib.merge_lora(adapted.denoiser)
    got = apply_loras(loading.load(str(folder)), [(f, 1.0)]).denoiser.state_dict()
    for k, v in adapted.denoiser.state_dict().items():
        assert max_rel_err(got[k], v) <= 1e-5, k
    if not dora:  # ComfyUI's plain merge, through Stability's layout and diffusers' converter
        theirs = reference_pipeline(ref, to_sd3_single_file(m), lora, folder, tmp_path).transformer.state_dict()
        for k, v in adapted.denoiser.state_dict().items():
            assert max_rel_err(v, theirs[k]) <= 1e-5, k


def test_comfyui_separate_text_encoders(pipes, tmp_path):  # noqa: F811
    """A single file without encoders (as sd3.5_medium.safetensors) and transformers' own files of CLIP-L, CLIP-G
    and T5, given in any order: the pipeline's image; a file that is none of them, or one given twice, one line."""
    from safetensors.torch import save_model
    from minidream.formats.files import ModelError, save_safetensors
    from minidream.formats.single_file import ARCHITECTURE
    from minidream.formats.sd3_single_file import architecture_json
    ref, m = pipes
    folder = m.source
    bare = tmp_path / "bare.safetensors"
    save_safetensors({k: v for k, v in to_sd3_single_file(m).items() if not k.startswith("text_encoders.")}, bare,
                     metadata={ARCHITECTURE: architecture_json(m)})
    files = {}
    for name in ("text_encoder_3", "text_encoder_2", "text_encoder"):
        files[name] = tmp_path / f"{name}.safetensors"
        save_model(ref.components[name], str(files[name]))  # T5's tied embedding once, as transformers saves it
    params = SamplingParams(steps=3, guidance=4.0, height=16, width=16)
    want = generate(m, PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    got = generate(loading.load(str(bare), tokenizer=str(folder), text_encoders=tuple(map(str, files.values()))),
                   PROMPTS, params, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(got, want)
    with pytest.raises(ModelError, match="holds no clip_l text encoder"):
        loading.load(str(bare), tokenizer=str(folder), text_encoders=(str(files["text_encoder_3"]),))
    with pytest.raises(ModelError, match=r"--text-encoders .*bare\.safetensors: not a CLIP-L, CLIP-G or T5"):
        loading.load(str(bare), tokenizer=str(folder), text_encoders=(str(bare),))
    twice = (str(files["text_encoder"]), str(files["text_encoder"]))
    with pytest.raises(ModelError, match="already given"):
        loading.load(str(bare), tokenizer=str(folder), text_encoders=twice)
    with pytest.raises(ModelError, match="no such file"):
        loading.load(str(bare), tokenizer=str(folder), text_encoders=(str(tmp_path / "nope.safetensors"),))
    with pytest.raises(ModelError, match="which --no-t5 leaves unread"):
        loading.load(str(bare), tokenizer=str(folder), text_encoders=(str(files["text_encoder_3"]),), t5=False)
    with pytest.raises(ModelError, match="only those take"):
        loading.load(str(folder), text_encoders=(str(files["text_encoder"]),))
