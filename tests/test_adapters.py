"""LoRAs and embeddings from other tools through `minidream sample`, against diffusers' load_lora_weights /
set_adapters / load_textual_inversion: the same image within 1/255."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_train import instance_dir, run_cli, train_args  # noqa: F401 (instance_dir is a fixture)

KW = dict(safety_checker=None, requires_safety_checker=False)


def sample(model, out, prompt, *args):
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(model), "--prompt", prompt,
                        "--steps", "4", "--height", "32", "--width", "32", "--seed", "5", "--guidance", "5",
                        "--out", str(out), "--no-progress", *map(str, args)], capture_output=True, text=True)
    return r


def ours(model, out, prompt, *args):
    from PIL import Image
    r = sample(model, out, prompt, *args)
    assert r.returncode == 0, r.stderr
    return torch.from_numpy(np.array(Image.open(out / "0000.png")))


def theirs(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompt, num_inference_steps=4, height=32, width=32, guidance_scale=5,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    return torch.from_numpy((img * 255).round().astype(np.uint8))


def locon_file(path, unet, text_encoder, rank, alpha, seed, te=True):
    """A kohya/LyCORIS LoCon file: every Linear and Conv2d of the resnets (3×3 convs, time_emb_proj, shortcut),
    the transformers (1×1 proj_in/out, attention, feed-forward), the up/downsamplers and the text encoder MLPs
    and attention; alpha != rank."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = [("lora_unet_", n, m) for n, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ("blocks" in n or "mid_block" in n)]
    if te:
        targets += [("lora_te_", n, m) for n, m in text_encoder.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for prefix, name, m in targets:
        key = prefix + name.replace(".", "_")
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        sd[f"{key}.lora_down.weight"] = down * 0.3 / down[0].numel() ** 0.5
        sd[f"{key}.lora_up.weight"] = up * 0.3 / rank ** 0.5
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return path


def test_kohya_locon_loras_several_at_once_give_diffusers_image(sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **KW)
    a = locon_file(tmp_path / "a.safetensors", pipe.unet, pipe.text_encoder, rank=4, alpha=2, seed=0)
    b = locon_file(tmp_path / "b.safetensors", pipe.unet, pipe.text_encoder, rank=2, alpha=3, seed=1, te=False)
    prompt = "a red striped star"
    base = theirs(pipe, prompt)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    want = theirs(pipe, prompt)
    assert (want.int() - base.int()).abs().max() > 20, "the LoRAs must change the image for the test to mean anything"
    got = ours(sd1_dir, tmp_path / "o", prompt, "--lora", f"{a}:0.7", "--lora", b)
    assert (got.int() - want.int()).abs().max() <= 1


def test_lora_metadata_alpha_and_old_names(sd1_dir, tmp_path):
    """diffusers-format files: α/r from `lora_adapter_metadata` (PEFT's lora_alpha != r), and the older
    attention-processor key names, which must merge exactly as their PEFT spelling."""
    from diffusers import StableDiffusionPipeline
    from minidream.formats import loading
    from minidream.formats.lora_files import apply_loras
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **KW)
    g = torch.Generator().manual_seed(3)
    sd, modules = {}, []
    for n, m in pipe.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            modules.append(n)
            sd[f"unet.{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
            sd[f"unet.{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
    targets = sorted({n.split(".")[-1] if not n.endswith("out.0") else "to_out.0" for n in modules})
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": targets}
    f = tmp_path / "peft.safetensors"
    save_file(sd, str(f), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    prompt = "a blue toy"
    base = theirs(pipe, prompt)
    pipe.load_lora_weights(str(f))
    want = theirs(pipe, prompt)
    assert (want.int() - base.int()).abs().max() > 20
    assert (ours(sd1_dir, tmp_path / "o", prompt, "--lora", f).int() - want.int()).abs().max() <= 1
    # the same adapters under the attention-processor names (α = 8 as `.alpha` keys) merge to the same weights
    old = {}
    for k, v in sd.items():
        n = k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
        head, proj = n.rsplit(".", 1) if not n.endswith("to_out.0") else (n.removesuffix(".to_out.0"), "to_out")
        side = "down" if "lora_A" in k else "up"
        head = head.replace(".attn1", ".attn1.processor").replace(".attn2", ".attn2.processor")
        old[f"{head}.{proj}_lora.{side}.weight"] = v
        old[f"{n}.alpha"] = torch.tensor(8.0)
    f_old = tmp_path / "old.safetensors"
    save_file(old, str(f_old))
    m1, m2 = loading.load(str(sd1_dir)), loading.load(str(sd1_dir))
    apply_loras(m1, [(f, 1.0)])
    apply_loras(m2, [(f_old, 1.0)])
    for (k, v1), v2 in zip(m1.unet.state_dict().items(), m2.unet.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_learned_token_and_lora_give_diffusers_image(sd1_dir, instance_dir, tmp_path):
    """train --train lora --train-text-encoder --train-token, then sample --lora L --embedding E."""
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    r = run_cli(*train_args(sd1_dir, instance_dir, out, "--train", "lora", "--train-text-encoder", "--train-token",
                            "--lr", 3e-2, "--token-lr", 0.1, "--save-as", "lora-diffusers", "--save-as", "lora-kohya"))
    assert r.exit_code == 0, r.output
    prompt = "a photo of <sks> dog"
    for lora in (out / "lora" / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **KW)
        pipe.load_lora_weights(str(lora))
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token="<sks>")
        want = theirs(pipe, prompt)
        got = ours(sd1_dir, tmp_path / lora.stem, prompt, "--lora", lora, "--embedding",
                   out / "learned_embeds.safetensors")
        assert (got.int() - want.int()).abs().max() <= 1, lora.name


@pytest.mark.parametrize("fmt", ["a1111-pt", "a1111-safetensors", "diffusers-multi"])
def test_multi_vector_embeddings_of_other_tools(sd1_dir, tmp_path, fmt):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, **KW)
    vec = torch.randn(3, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(4))
    if fmt == "a1111-pt":
        f = tmp_path / "mytok.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "mytok", "step": 3000}, f)
        extra = ["--allow-pickle"]
    elif fmt == "a1111-safetensors":
        f = tmp_path / "mytok.safetensors"
        save_file({"emb_params": vec}, str(f))
        extra = ["--embedding-token", "mytok"]
    else:
        f = tmp_path / "learned.safetensors"
        save_file({"mytok": vec}, str(f))
        extra = []
    prompt = "a mytok star"
    pipe.load_textual_inversion(str(f), token="mytok")
    want = theirs(pipe, prompt)
    got = ours(sd1_dir, tmp_path / "o", prompt, "--embedding", f, *extra)
    assert (got.int() - want.int()).abs().max() <= 1


def test_bad_lora_and_embedding_files_are_one_line(sd1_dir, tmp_path):
    from minidream.formats import loading
    m = loading.load(str(sd1_dir))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 2)}, str(unknown))
    te2 = tmp_path / "te2.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}, str(te2))
    shape = tmp_path / "shape.safetensors"
    name = next(n for n, mod in m.unet.named_modules() if n.endswith("attn1.to_q"))
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, 7), f"unet.{name}.lora_B.weight": torch.zeros(5, 4)},
              str(shape))
    pair = tmp_path / "pair.safetensors"
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, 7), f"unet.{name}.lora_B.weight": torch.zeros(5, 3)},
              str(pair))
    half = tmp_path / "half.safetensors"
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, 7)}, str(half))
    nomodule = tmp_path / "nomodule.safetensors"
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2)}, str(nomodule))
    wide = tmp_path / "wide.safetensors"
    save_file({"<w>": torch.zeros(768)}, str(wide))
    taken = tmp_path / "taken.safetensors"
    save_file({"a</w>": torch.zeros(32)}, str(taken))
    notemb = tmp_path / "notemb.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.zeros(3)}, str(notemb))
    cases = [(["--lora", unknown], "incomplete LoHa module"), (["--lora", te2], "second text encoder"),
             (["--lora", shape], "LoRA [5, 7] vs weight [64, 64]"), (["--lora", pair], "not a LoRA pair"),
             (["--lora", half], "only one of"), (["--lora", nomodule], "no_such_block"),
             (["--lora", tmp_path / "missing.safetensors:0.5"], "no such file"),
             (["--embedding", wide], "width 768"), (["--embedding", notemb], "not a textual-inversion embedding"),
             (["--embedding", taken], "already in the vocabulary")]
    for args, needle in cases:
        r = sample(sd1_dir, tmp_path / "o", "x", *args)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
