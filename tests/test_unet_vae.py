"""UNet and VAE against diffusers' UNet2DConditionModel / AutoencoderKL, random weights from a seed,
loaded through minidream's loader from the files diffusers wrote."""
import pytest
import torch

from minidream.formats import configs, diffusers_layout
from minidream.models import stable_diffusion as model_lib
from tests.conftest import max_rel_err, perturb, tiny_unet_kwargs, tiny_vae_kwargs

TOL = 1e-4  # fp32, relative to the output's scale


def ref_unet(folder, sd2=False, seed=0, **overrides):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = perturb(UNet2DConditionModel(**{**tiny_unet_kwargs(sd2), **overrides}), seed).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


def unet_inputs(B, cfg, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, size, size, generator=g),
            torch.randn(B, 77, cfg.context_dim, generator=g))


@pytest.mark.parametrize("sd2", [False, True])
def test_tiny_unet_parity(tmp_path, sd2):
    ref = ref_unet(tmp_path, sd2)
    ours = diffusers_layout.load_unet(tmp_path)
    for B in (1, 2):
        x, ctx = unet_inputs(B, ours.config)
        for t in (0, 1, 500, 999):
            with torch.no_grad():
                want = ref(x, t, encoder_hidden_states=ctx).sample
                got = ours(x, torch.full((B,), t), ctx)
            assert max_rel_err(got, want) <= TOL, (B, t)
    # a batch with a different timestep per example
    x, ctx = unet_inputs(2, ours.config, seed=1)
    t = torch.tensor([3, 801])
    with torch.no_grad():
        assert max_rel_err(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample) <= TOL


def test_unet_three_stages_attention_first(tmp_path):
    """The SD arrangement (attention in every stage but the last), with 3 stages and odd head counts."""
    ref = ref_unet(tmp_path, block_out_channels=(32, 48, 64), attention_head_dim=(2, 3, 4),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    ours = diffusers_layout.load_unet(tmp_path)
    x, ctx = unet_inputs(2, ours.config)
    with torch.no_grad():
        assert max_rel_err(ours(x, 10, ctx), ref(x, 10, encoder_hidden_states=ctx).sample) <= TOL


def test_unet_gradients_match(tmp_path):
    ref = ref_unet(tmp_path)
    ours = diffusers_layout.load_unet(tmp_path).requires_grad_(True)
    x, ctx = unet_inputs(2, ours.config)
    t = torch.tensor([10, 700])
    target = torch.randn_like(x)
    torch.nn.functional.mse_loss(ref(x, t, encoder_hidden_states=ctx).sample, target).backward()
    torch.nn.functional.mse_loss(ours(x, t, ctx), target).backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert max_rel_err(p.grad, theirs[name].grad) <= TOL, name


@pytest.mark.parametrize("option", ["checkpointing", "channels_last"])
def test_unet_options_keep_parity(tmp_path, option):
    ref = ref_unet(tmp_path)
    ours = diffusers_layout.load_unet(tmp_path).requires_grad_(True).train()
    x, ctx = unet_inputs(2, ours.config)
    if option == "checkpointing":
        ours.set_gradient_checkpointing(True)
    else:
        ours.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    out = ours(x, torch.tensor([5, 600]), ctx)
    out.square().mean().backward()
    ref(x, torch.tensor([5, 600]), encoder_hidden_states=ctx).sample.square().mean().backward()
    assert max_rel_err(out, ref(x, torch.tensor([5, 600]), encoder_hidden_states=ctx).sample) <= TOL
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert max_rel_err(p.grad, theirs[name].grad) <= TOL, name


def test_tiny_vae_parity(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ref = perturb(AutoencoderKL(**tiny_vae_kwargs()), 3).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = diffusers_layout.load_vae(tmp_path)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert max_rel_err(mean, dist.mean) <= TOL
        assert max_rel_err(logvar, dist.logvar) <= TOL
        assert max_rel_err(ours.decode(z), ref.decode(z).sample) <= TOL


def test_vae_loads_old_attention_names(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file
    ref = perturb(AutoencoderKL(**tiny_vae_kwargs()), 4).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in load_file(f).items()}
    assert any(".query." in k for k in old)
    save_file(old, f)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert max_rel_err(diffusers_layout.load_vae(tmp_path).decode(z), ref.decode(z).sample) <= TOL


REAL = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
}


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_real_architecture_keys_and_shapes(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from minidream.models import unet, vae
    with torch.device("meta"):
        ref = UNet2DConditionModel(**REAL[family])
        ours = unet.UNet2DConditionModel(unet.PRESETS[family])
        rv = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
                           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
        ov = vae.AutoencoderKL(vae.PRESETS[family])
    for a, b in ((ours, ref), (ov, rv)):
        sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
        assert sa == sb
    # the config translation reads the official config into exactly our preset
    assert model_lib.preset_of(configs.unet_config(dict(ref.config), "config.json"), unet.PRESETS) == family


@pytest.mark.parametrize("family", ["sd15", pytest.param("sd21", marks=pytest.mark.slow)])  # (18 s; sd15 runs)
def test_real_architecture_numeric_forward(tmp_path, family):
    """Full widths and depths, random weights, one forward on a 16x16 latent."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**REAL[family]).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = diffusers_layout.load_unet(tmp_path)
    x, ctx = unet_inputs(1, ours.config, size=16)
    with torch.no_grad():
        assert max_rel_err(ours(x, 500, ctx), ref(x, 500, encoder_hidden_states=ctx).sample) <= TOL
