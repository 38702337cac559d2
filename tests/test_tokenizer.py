import pytest

from minidream.models.tokenizer import CLIPTokenizer

TRICKY = [
    "a photo of sks dog", "", "  Leading and   trailing   spaces  ", "UPPER lower MiXeD",
    "don't you'll we've they're I'm she'd it's", "punctuation!!! ... ?!, (brackets) [x] {y}",
    "café naïve résumé Ångström", "emoji 🐶🐕‍🦺 and flags 🇯🇵", "中文 日本語のテキスト 한국어",
    "numbers 12345 and 3.14159", "a literal <|endoftext|> in the middle", "<|startoftext|>hello",
    "tabs\tand\nnewlines", "hyphen-ated and under_score and slash/word", "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
    "a very long prompt " * 30,
]


@pytest.fixture(scope="module")
def pair(clip_vocab_dir):
    from transformers import CLIPTokenizer as HFTokenizer
    hf = HFTokenizer(str(clip_vocab_dir / "vocab.json"), str(clip_vocab_dir / "merges.txt"))
    return CLIPTokenizer.from_dir(clip_vocab_dir), hf


def test_real_vocabulary_size(pair):
    ours, _ = pair
    assert len(ours) == 49408 and ours.bos_id == 49406 and ours.eos_id == 49407


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_transformers(pair, text):
    ours, ref = pair
    want = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours([text])[0].tolist() == want
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids


def test_sd2_pads_with_its_own_token(clip_vocab_dir, tmp_path):
    import json, shutil
    for n in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocab_dir / n, tmp_path / n)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tok = CLIPTokenizer.from_dir(tmp_path)
    ids = tok(["a dog"])[0].tolist()
    assert ids[:4] == [49406, 320, 1929, 49407] and set(ids[4:]) == {tok.vocab["!"]}


def test_truncation_reports_what_was_cut(pair):
    ours, _ = pair
    assert ours.truncated("a short prompt") is None
    cut = ours.truncated("word " * 80)
    assert cut is not None and cut.strip() == " ".join(["word"] * 5)


def test_added_token_is_one_id_and_round_trips(pair, tmp_path):
    ours, _ = pair
    tok = CLIPTokenizer(ours.vocab, ours.merges)
    new = tok.add_token("<sks>")
    assert new == 49408 and len(tok) == 49409
    assert tok.encode("a photo of <sks> dog") == tok.encode("a photo of") + [new] + tok.encode("dog")
    tok.save(tmp_path)
    back = CLIPTokenizer.from_dir(tmp_path)
    assert back.encode("a <sks> toy") == tok.encode("a <sks> toy")
    from transformers import CLIPTokenizer as HFTokenizer
    want = [49406] + tok.encode("a <sks> toy") + [49407]
    assert HFTokenizer.from_pretrained(tmp_path)("a <sks> toy").input_ids == want
