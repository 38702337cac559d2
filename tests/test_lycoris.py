"""LyCORIS LoHa and LoKr files through `sample --lora`, in files written by the LyCORIS package itself (linear and conv
modules, with and without Tucker cores), merged as A1111 and ComfyUI merge them: at the module's α/r, where the
package's own merge_to (4.1.3) scales by (α/r)² (measured here: a fixed package fails this test, and then the
correction below goes)."""
import pytest
import torch
from safetensors.torch import save_file

from minidream.formats import loading
from minidream.formats.files import ModelError
from minidream.formats.lora_files import apply_loras

pytest.importorskip("lycoris")


def lycoris_file(unet, path, algo: str, tucker: bool, seed: int = 0):
    """A trained-looking LyCORIS network on a diffusers UNet, saved under kohya's names; returns (network, per-module
    α/r)."""
    from lycoris import create_lycoris
    torch.manual_seed(seed)
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, conv_dim=2, conv_alpha=3.0,
                         use_tucker=tucker, factor=4)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():  # trained factors (LoHa's w2_a and LoKr's w2 start at zero)
            p.normal_(std=0.3)
    sd = {f"{m.lora_name}.{k}".replace("lycoris_", "lora_unet_", 1): v.detach().clone()
          for m in net.loras for k, v in m.state_dict().items()}
    save_file(sd, path)
    return net, sd


def consumer_merge(unet, net, strength: float):
    """The network merged into `unet` as A1111 and ComfyUI merge it: each module's ΔW at its α/r (the package's
    merge_to, divided by the extra α/r it applies), times the strength."""
    scales = {m.lora_name.replace("lycoris_", "", 1): m.scale for m in net.loras}
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    net.merge_to(1.0)
    net.restore()  # the modules' own forward again (apply_to hooked them: the merged ΔW would count twice)
    with torch.no_grad():
        for name, mod in unet.named_modules():
            scale = scales.get(name.replace(".", "_"))
            if scale is not None:
                w = base[f"{name}.weight"]
                mod.weight.copy_(w + strength * (mod.weight - w) / scale)
    return len({float(x) for x in scales.values()})


@pytest.mark.parametrize("algo,tucker", [("loha", False), ("loha", True), ("lokr", False), ("lokr", True)])
def test_lycoris_files_merge_as_a1111_and_comfyui_merge_them(sd1_dir, tmp_path, algo, tucker):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(sd1_dir / "unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    f = tmp_path / f"{algo}.safetensors"
    net, sd = lycoris_file(unet, f, algo, tucker)
    assert any(".hada_t1" in k or ".lokr_t2" in k for k in sd) == tucker
    assert any("_conv1." in k for k in sd)  # conv modules are in it (resnet 3x3s)
    assert consumer_merge(unet, net, 0.7) == 2  # linear α/r = 0.5, conv 1.5: both scales are exercised
    merged = unet.state_dict()
    ours = loading.load(str(sd1_dir))
    apply_loras(ours, [(f, 0.7)])
    got = ours.unet.state_dict()
    changed = 0
    for k, v in base.items():
        if k.endswith(".weight") and not torch.equal(merged[k], v):
            changed += 1
            assert torch.allclose(got[k], merged[k], rtol=1e-4, atol=1e-5 * float(v.abs().max())), k
        else:
            assert torch.equal(got[k], v), k
    assert changed > 20


def test_a_lokr_file_draws_the_image_diffusers_draws_with_it_merged(sd1_dir, tmp_path):
    """The whole path: `sample --lora FILE:0.8` = diffusers' pipeline with the package's LoKr merged, within 1/255."""
    import subprocess
    import sys
    import numpy as np
    from PIL import Image
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir, safety_checker=None, requires_safety_checker=False)
    f = tmp_path / "lokr.safetensors"
    net, _ = lycoris_file(pipe.unet, f, "lokr", False, seed=1)
    consumer_merge(pipe.unet, net, 0.8)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a red toy", num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(2)).images[0]
    r = subprocess.run([sys.executable, "-m", "minidream", "sample", "--model", str(sd1_dir), "--prompt", "a red toy",
                        "--steps", "3", "--seed", "2", "--height", "32", "--width", "32", "--lora", f"{f}:0.8",
                        "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.array(Image.open(tmp_path / "o" / "0000.png")).astype(int)
    assert np.abs(got - (want * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop(next(k for k in sd if k.endswith(".hada_w2_b"))), "incomplete LoHa module"),
    (lambda sd: sd.update({k: torch.zeros(3, 5) for k in [next(k for k in sd if k.endswith(".hada_w1_a"))]}),
     "does not match this model"),
    (lambda sd: sd.update({k: torch.full_like(v, 1e25) for k, v in list(sd.items()) if k.endswith("_b")}),
     "overflow"),
    (lambda sd: sd.update({k: (v * 100).to(torch.int8) for k, v in list(sd.items()) if "hada_" in k}),
     "hold torch.int8 values, not floating point"),
])
def test_malformed_lycoris_files_are_one_line(sd1_dir, tmp_path, edit, needle):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    f = tmp_path / "loha.safetensors"
    lycoris_file(UNet2DConditionModel.from_pretrained(sd1_dir / "unet"), f, "loha", False)
    sd = load_file(f)
    edit(sd)
    save_file(sd, f)
    with pytest.raises(ModelError, match=needle):
        apply_loras(loading.load(str(sd1_dir)), [(f, 1.0)])


def test_alpha_0_reads_as_alpha_rank_and_says_so(sd1_dir, tmp_path, capsys):
    """kohya, LyCORIS and A1111 read α = 0 as α = r (ComfyUI's scale 0 would add nothing): the same merge as a file
    whose α is its rank, with a warning."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    f, g = tmp_path / "zero.safetensors", tmp_path / "rank.safetensors"
    lycoris_file(UNet2DConditionModel.from_pretrained(sd1_dir / "unet"), f, "loha", False)
    sd = load_file(f)
    ranks = {k.removesuffix(".alpha"): sd[k.removesuffix(".alpha") + ".hada_w1_b"].shape[0]
             for k in sd if k.endswith(".alpha")}
    save_file({k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in sd.items()}, f)
    save_file({k: torch.tensor(float(ranks[k.removesuffix(".alpha")])) if k.endswith(".alpha") else v
               for k, v in sd.items()}, g)
    zero, rank = loading.load(str(sd1_dir)), loading.load(str(sd1_dir))
    apply_loras(zero, [(f, 1.0)])
    assert "alpha 0 on" in capsys.readouterr().err
    apply_loras(rank, [(g, 1.0)])
    base = loading.load(str(sd1_dir)).unet.state_dict()
    got, want = zero.unet.state_dict(), rank.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got) and any(not torch.equal(got[k], base[k]) for k in got)


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_dora_files_merge_as_lycoris_merges_them(sd1_dir, tmp_path, algo):
    """DoRA (dora_scale, the magnitude on the output axis) on LoRA and LoHa modules, written and merged by the
    LyCORIS package (α = r, where its merge and the consumers' agree), against `sample --lora`'s merge."""
    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris
    unet = UNet2DConditionModel.from_pretrained(sd1_dir / "unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=4.0, algo=algo, conv_dim=2, conv_alpha=2.0,
                         dora_wd=True)
    net.apply_to()
    with torch.no_grad():
        for name, p in net.named_parameters():  # a trained magnitude and direction
            p.mul_(1 + 0.3 * torch.rand_like(p)) if "dora" in name else p.normal_(std=0.3)
    sd = {f"{m.lora_name}.{k}".replace("lycoris_", "lora_unet_", 1): v.detach().clone()
          for m in net.loras for k, v in m.state_dict().items()}
    assert sum(k.endswith(".dora_scale") for k in sd) > 20
    f = tmp_path / "dora.safetensors"
    save_file(sd, f)
    net.merge_to(1.0)
    merged = unet.state_dict()
    ours = loading.load(str(sd1_dir))
    apply_loras(ours, [(f, 1.0)])
    got = ours.unet.state_dict()
    changed = [k for k in got if not torch.equal(merged[k], base[k])]
    assert len(changed) > 20
    for k in changed:
        change = (merged[k] - base[k]).abs().max()
        assert (got[k] - merged[k]).abs().max() <= 1e-5 * change, k


def test_dora_on_the_input_axis_is_a1111s():
    """A dora_scale of one entry per input column (LyCORIS' older layout, the one A1111 reads): W' = (W + ΔW) · m /
    ||W + ΔW|| with the norm over each column, A1111's apply_weight_decompose."""
    from minidream.formats.lycoris_files import Decomposed, LowRank
    g = torch.Generator().manual_seed(0)
    w, up, down = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    m = torch.rand(1, 5, generator=g) + 0.5
    merged = w + 0.5 * up @ down
    want = merged * (m / merged.norm(dim=0, keepdim=True)) - w
    got = Decomposed(LowRank(up, down, 0.5), m).delta(w)
    assert torch.allclose(got, want, atol=1e-6)
