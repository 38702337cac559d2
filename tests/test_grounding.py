"""The demo pretraining's grounding term (minidream/demo/grounding.py): which tokens it grounds, that it is the
quantity `minidream eval` measures, and that it trains through the UNet's cross-attention hooks."""
import random

import pytest
import torch

from minidream.demo import grounding, world
from minidream.demo.evaluation import subject_mask, token_span
from minidream.demo.architecture import DEMO_DIR, MAX_TOKENS
from minidream.inspect.attention_maps import localisation
from minidream.models.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    t = train_bpe([world.caption(world.random_toy(rng), rng) for _ in range(400)], 256 + 2 + 512)
    t.max_length = MAX_TOKENS
    return t


def test_object_tokens_are_the_words_naming_the_toy(tok):
    captions = ["a red striped star on a gray background", "a toy", "", "a blue heart on a blue background",
                "a purple dotted toy"]
    w = grounding.object_tokens(tok, captions, MAX_TOKENS)
    assert w.shape == (5, MAX_TOKENS)
    for b, (text, named) in enumerate(zip(captions, (["red", "striped", "star"], ["toy"], [], ["blue", "heart"],
                                                       ["purple", "dotted", "toy"]))):
        want = torch.zeros(MAX_TOKENS)
        for word in named:  # the first occurrence: the toy's "blue" comes before the background's
            span = token_span(tok, text, word)
            want[span.start:span.stop] = 1
        assert torch.equal(w[b], want), text
    # a word of several pieces is grounded whole
    w = grounding.object_tokens(tok, ["a zzqx star"], MAX_TOKENS)
    assert w[0].sum() == len(tok.encode("zzqx")) + len(tok.encode("star"))


def test_grounding_loss_is_one_minus_the_measured_share():
    """At the latent's resolution with a 0/1 coverage, 1 - loss is the share of each naming token's mass on the toy:
    inspect.attention_maps.localisation × the toy's share, the number `minidream eval` reports."""
    g = torch.Generator().manual_seed(0)
    B, side, M = 3, 8, MAX_TOKENS
    cover = (torch.rand(B, side, side, generator=g) > 0.7).float()
    probs = torch.rand(B, side * side, M, generator=g).softmax(-1)
    weights = torch.zeros(B, M)
    weights[:, 2:4] = 1
    loss = grounding.grounding_loss([probs], weights, cover)
    shares = [localisation(probs[b, :, t].view(side, side), cover[b].bool()) * cover[b].mean().item()
              for b in range(B) for t in (2, 3)]
    assert loss.item() == pytest.approx(1 - sum(shares) / len(shares), abs=1e-6)
    # all of a token's attention on the toy: nothing to learn; a coarser layer sees the coverage area-averaged
    on_toy = cover.flatten(1)[..., None].expand(-1, -1, M) / cover.flatten(1).sum(1)[:, None, None]
    assert grounding.grounding_loss([on_toy], weights, cover).item() == pytest.approx(0, abs=1e-6)
    coarse = torch.full((B, 4, M), 0.25)  # a 2×2 layer looking everywhere alike: 1 - the toy's share
    want = 1 - cover.mean((1, 2))
    assert grounding.grounding_loss([coarse], weights, cover).item() == pytest.approx(want.mean().item(), abs=1e-6)
    coarse = torch.rand(B, 4, M, generator=g).softmax(1)  # and one that does not: the cover pooled block by block
    pooled = cover.view(B, 2, 4, 2, 4).mean((2, 4)).flatten(1)  # (B, 4): top-left, top-right, bottom-left, ...
    inside = (coarse * pooled[..., None]).sum(1) / coarse.sum(1)
    want = ((1 - inside) * weights).sum() / weights.sum()
    assert grounding.grounding_loss([coarse], weights, cover).item() == pytest.approx(want.item(), abs=1e-6)


def test_coverage_is_the_rendered_toy():
    rng = random.Random(5)
    for _ in range(5):
        toy = world.random_toy(rng, allow_subject=True)
        img = torch.frombuffer(bytearray(world.render(toy).tobytes()), dtype=torch.uint8).view(1, 32, 32, 3)
        drawn, covered = subject_mask(img)[0], world.coverage(toy, world.SIZE) > 0.5
        assert (drawn == covered).float().mean() > 0.95, toy
        c8 = world.coverage(toy, 8)
        assert c8.shape == (8, 8) and c8.mean().item() == pytest.approx(covered.float().mean().item(), abs=0.03)


@pytest.mark.skipif(not (DEMO_DIR / "model_index.json").exists(), reason="demo model not built")
def test_the_term_trains_the_cross_attention_and_the_hooks_come_off():
    """Two steps on the demo UNet's cross-attention: the term has gradients in every to_q / to_k and lowers itself;
    once the hooks are removed the UNet reports nothing more."""
    from minidream.formats.loading import load
    m = load(str(DEMO_DIR), dtype=torch.float32)
    rng = random.Random(1)
    toys = [world.random_toy(rng) for _ in range(8)]
    caps = [f"a {t.colour} {t.pattern} {t.shape}" for t in toys]
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 300)
    ref = m.unet(x, t, m.text_encoder(m.tokenizer(caps))).detach()
    tap, hooks = grounding.tap_cross_attention(m.unet)
    params = [p.requires_grad_() for n, p in m.unet.named_parameters() if "attn2.to_q" in n or "attn2.to_k" in n]
    opt = torch.optim.SGD(params, lr=1.0)
    weights, cover = grounding.object_tokens(m.tokenizer, caps, m.tokenizer.max_length), grounding.coverage(toys, 8)
    losses = []
    for _ in range(2):
        m.unet(x, t, m.text_encoder(m.tokenizer(caps)))
        assert len(tap.probs) == sum(n.endswith("attn2") for n, _ in m.unet.named_modules())
        loss = grounding.grounding_loss(tap.probs, weights, cover)
        tap.probs.clear()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        m.unet(x, t, m.text_encoder(m.tokenizer(caps)))
    assert not tap.probs and not torch.equal(ref, m.unet(x, t, m.text_encoder(m.tokenizer(caps))).detach())
