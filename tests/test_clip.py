import pytest
import torch

from minidream.formats import diffusers_layout
from tests.conftest import max_rel_err, perturb, tiny_clip_config

PROMPTS = ["a photo of sks dog", "", "A red, striped STAR on a green background!!", "a dog " * 40]


def save_clip(folder, hf_cfg, seed):
    from transformers import CLIPTextModel
    torch.manual_seed(seed)
    model = perturb(CLIPTextModel(hf_cfg).eval(), seed, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def compare(folder, ref, tok, tol=1e-5):
    ours = diffusers_layout.load_text_encoder(folder)
    ids = tok(PROMPTS)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = ours(ids)
    assert got.shape == want.shape
    assert max_rel_err(got, want) <= tol


@pytest.mark.parametrize("sd2", [False, True])
def test_tiny_text_encoder_parity(tmp_path, tiny_tokenizer, sd2):
    ref = save_clip(tmp_path, tiny_clip_config(len(tiny_tokenizer), sd2), seed=1)
    compare(tmp_path, ref, tiny_tokenizer)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_real_width_text_encoder_parity(tmp_path, tiny_tokenizer, family):
    """Real SD widths/heads/MLP/activation (random weights), 2 layers to keep CPU time down."""
    from transformers import CLIPTextConfig
    p = {"sd15": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu"),
         "sd21": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, hidden_act="gelu")}[family]
    cfg = CLIPTextConfig(vocab_size=len(tiny_tokenizer), num_hidden_layers=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **p)
    ref = save_clip(tmp_path, cfg, seed=2)
    compare(tmp_path, ref, tiny_tokenizer)


def test_loads_keys_with_text_model_prefix(tmp_path, tiny_tokenizer):
    """The official SD repos store `text_model.*` keys (older transformers); transformers 5 does not."""
    from safetensors.torch import load_file, save_file
    ref = save_clip(tmp_path, tiny_clip_config(len(tiny_tokenizer)), seed=3)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    prefixed = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(prefixed, f)
    compare(tmp_path, ref, tiny_tokenizer)


def test_text_encoder_presets_match_official_parameter_counts():
    from minidream.models.clip import PRESETS, CLIPTextModel
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in CLIPTextModel(PRESETS[n]).parameters()) for n in ("sd15", "sd21")}
    assert counts == {"sd15": 123_060_480, "sd21": 340_387_840}
