"""pretrain.tokenizer.ClipTokenizer (HF tokenizers) against an independent pure-Python CLIP BPE.

    .venv/bin/python -m pytest -q tests/test_tokenizer.py

The reference (tests/clip_bpe_reference.py) re-implements OpenAI's SimpleTokenizer with the
``regex`` package; every id the fast path produces is compared with it.
"""
from __future__ import annotations

import pickle
import random
import unicodedata
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from clip_bpe_reference import CLIP_PATTERN as REF_PATTERN
from clip_bpe_reference import ReferenceClipTokenizer, random_captions
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from pretrain.assets import require_vocab
from pretrain.tokenizer import (
    _FTFY_IDENTITY,
    _WHITESPACE_RUN,
    CLIP_PATTERN,
    EOT,
    SOT,
    ClipTokenizer,
    default_tokenizer,
)

HARD_STRINGS = [
    "", " ", "\t\n  \r\n", "hello world", "a photo of a cat.", "A PHOTO OF A CAT!!!",
    "12345", "3.14159 and 2,000,000", "1st 2nd 3rd 4th", "don't", "I'LL", "it's", "we've they're I'm she'd",
    "'s 't 're 've 'm 'll 'd", "O'Neil's rock'n'roll", "it’s “curly” quotes", "!!!???...---***",
    "(a)[b]{c}<d>", "@user #hashtag http://example.com/a_b?c=1&d=2", "$9.99 100% 50°C",
    "café über naïve Straße ŁÓDŹ", "e\u0301 vs é", "ﬁne ﬂow", "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ",
    "中文字符测试", "日本語のテキストです", "한국어 텍스트", "النص العربي", "русский текст Ёё",
    "हिन्दी पाठ", "ελληνικά ΣΑΣ", "עברית", "ภาษาไทย", "İstanbul ǅemal",
    "😀😃😄", "👍🏽 👨\u200d👩\u200d👧\u200d👦 🇫🇷🇩🇪", "❤️ ★★★ ©2020 ™", "½ ² ٣ Ⅻ ⑤",
    "&amp;", "&#39;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;lt;", "&nbsp;x&nbsp;", "<b>&amp;</b>",
    "cafÃ©", "â€œquotedâ€\x9d", "schÃ¶n", "Ã¼ber",
    "a  b\t\tc\n\nd\r\ne\u3000f\xa0g\u2028h", "\x00\x07\x1b[31mred\x1b[0m\x7f", "\x1c\x1d\x1e\x1fx",
    "zero\u200bwidth\ufeffbom", "\u0345\u0345 a\u0345b", "'ſ 'S", "\U0001F600" * 40,
    "<|endoftext|>", "<|startoftext|>hi<|endoftext|>", "x!!<|endoftext|>", "<|ENDOFTEXT|>", "<|end",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
]
LONG_CAPTION = " ".join(["a very long caption about a red bicycle, leaning on a wall"] * 20)


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def ref() -> ReferenceClipTokenizer:
    return ReferenceClipTokenizer.from_vocab_file(require_vocab())


def test_vocabulary_layout_matches_openai(tok, ref):
    assert tok.vocab_size == 49408 and (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok._tk.get_vocab() == ref.token_to_id  # every one of the 49,408 token -> id pairs
    assert tok._tk.id_to_token(0) == "!" and tok._tk.id_to_token(256) == "!</w>"
    assert default_tokenizer() is tok  # cached


def test_anchor_ids(tok, ref):
    cat = tok("a photo of a cat.")
    assert cat.dtype == torch.long and cat.shape == (1, 77)
    assert cat[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert cat[0, 8:].eq(0).all()
    assert tok("hello world")[0, :5].tolist() == [49406, 3306, 1002, 49407, 0]
    assert ref.encode("hello world") == [3306, 1002] and ref.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_exact(tok, ref, text):
    assert tok(text).tolist() == ref.tokenize(text)


def test_special_token_strings_follow_clip_regex(tok, ref):
    # Isolated by CLIP's regex -> the special id; glued to a symbol run -> ordinary BPE.
    assert ref.encode("<|endoftext|>") == [49407] == tok.encode(["<|endoftext|>"])[0]
    assert 49407 not in ref.encode("x!!<|endoftext|>")
    assert tok.encode(["x!!<|endoftext|>"])[0] == ref.encode("x!!<|endoftext|>")


def test_long_caption_truncation_keeps_eot(tok, ref):
    content = ref.encode(LONG_CAPTION)
    assert len(content) > 200
    row = tok(LONG_CAPTION)[0].tolist()
    assert row == [49406, *content[:75], 49407]
    assert tok(LONG_CAPTION, context_length=10)[0].tolist() == [49406, *content[:8], 49407]


def test_random_captions_exact(tok, ref):
    caps = random_captions(500, seed=1234)
    assert sum(len(ref.encode(c)) > 75 for c in caps) >= 2  # some are truncated
    assert tok(caps).tolist() == ref.tokenize(caps)


def test_shapes_context_length_and_mixed_batch(tok, ref):
    texts = ["", "cat", "a photo of a very small dog", LONG_CAPTION]
    for ctx in (2, 5, 16, 77, 128):
        out = tok(texts, context_length=ctx)
        assert out.shape == (4, ctx) and out.dtype == torch.long
        assert out.tolist() == ref.tokenize(texts, ctx)
        for row, text in zip(out, texts):
            n = min(len(ref.encode(text)), ctx - 2)
            assert row[0] == 49406 and row[n + 1] == 49407 and row[n + 2 :].eq(0).all()
            assert int(row.argmax()) == n + 1  # the text tower pools at the argmax id
    assert tok(("a", "b")).shape == (2, 77)
    assert tok([]).shape == (0, 77)


def test_bad_input_is_a_clear_error(tok):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["ok", None])
    with pytest.raises(TypeError):
        tok(123)
    with pytest.raises(ValueError, match="context_length"):
        tok("x", context_length=1)


def test_decode_matches_clip(tok, ref):
    for text in ["Hello, wörld! 😀 12", "日本語 &amp; don't", ""]:
        row = tok(text)[0].tolist()
        assert tok.decode(row) == ref.decode(ref.encode(text))
    assert tok.decode(tok("hello world")[0].tolist()) == "hello world "


def test_whitespace_set_is_regex_backslash_s():
    # CLIP collapses `regex`'s \s; the fast path spells that set out for the `re` module.
    ref_ws = regex.compile(r"\s")
    for c in range(0x110000):
        ch = chr(c)
        assert bool(_WHITESPACE_RUN.fullmatch(ch)) == bool(ref_ws.fullmatch(ch)), hex(c)


def test_ftfy_skip_is_identity():
    rng = random.Random(0)
    alphabet = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert _FTFY_IDENTITY.fullmatch(s) and ftfy.fix_text(s) == s
    # Why '&' and non-ASCII are excluded: ftfy changes such text.
    assert ftfy.fix_text("&amp;amp;") != "&amp;amp;" and ftfy.fix_text("cafÃ©") == "café"
    assert not _FTFY_IDENTITY.fullmatch("&amp;") and not _FTFY_IDENTITY.fullmatch("a\x07")


def test_pre_tokenisation_agrees_on_every_assigned_code_point():
    """The Rust (onig) split equals CLIP's `regex` findall for each code point assigned in
    this Python's Unicode tables, in letter / digit / contraction / symbol contexts."""
    split = pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)
    cps = [c for c in range(1, 0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for k in range(0, len(cps), 4000):
        text = " ".join(f"a{chr(c)}b '{chr(c)}x {chr(c)}{chr(c)}1" for c in cps[k : k + 4000]).lower()
        got = [piece for piece, _ in split.pre_tokenize_str(text)]
        assert got == REF_PATTERN.findall(text), f"code points {hex(cps[k])}..{hex(cps[min(k + 3999, len(cps) - 1)])}"


def test_pickle_round_trip_and_dataloader_workers(tok, ref):
    texts = HARD_STRINGS[:20]
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(texts), tok(texts))

    class Captions(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(texts)

        def __getitem__(self, i: int) -> torch.Tensor:
            return tok(texts[i])[0]

    loader = torch.utils.data.DataLoader(Captions(), batch_size=4, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), torch.tensor(ref.tokenize(texts)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ClipTokenizer, Path]:
    captions = random_captions(300, seed=7)
    corpus = tmp_path_factory.mktemp("corpus") / "captions.txt"
    corpus.write_text("\n".join(c.replace("\n", " ").replace("\r", " ") for c in captions[150:]), encoding="utf-8")
    new = ClipTokenizer.train([*captions[:150], corpus], vocab_size=1000)
    return new, new.save(tmp_path_factory.mktemp("tok"))


def test_trained_vocabulary_layout(trained, tok):
    new, path = trained
    assert path.name == "tokenizer.json" and path.is_file()
    assert new.vocab_size == 1000 and (new.sot_token_id, new.eot_token_id) == (998, 999)
    vocab = new._tk.get_vocab()
    assert vocab[SOT] == 998 and vocab[EOT] == 999
    assert all(vocab[t] == i for t, i in tok._tk.get_vocab().items() if i < 512)  # same 512 base tokens


def test_trained_vocabulary_round_trips_and_matches_reference(trained):
    new, path = trained
    texts = random_captions(200, seed=99) + HARD_STRINGS
    loaded = ClipTokenizer.load(path)
    assert ClipTokenizer.load(path.parent).vocab_size == 1000
    ids = new(texts)
    assert torch.equal(loaded(texts), ids)
    assert torch.equal(pickle.loads(pickle.dumps(loaded))(texts), ids)
    assert ids.tolist() == ReferenceClipTokenizer.from_tokenizer_json(path).tokenize(texts)
    # Bytes never seen in training still encode (no unknown token, nothing dropped).
    assert new.decode(new("日本 wörld 😀")[0].tolist()) == "日本 wörld 😀 "


def test_train_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        ClipTokenizer.train(["a b c"], vocab_size=100)
    with pytest.raises(TypeError, match="int"):
        ClipTokenizer.train(["ok", 3], vocab_size=600)


def test_load_rejects_tokenizer_whose_eot_is_not_last(tmp_path):
    bad = Tokenizer(models.BPE(vocab={EOT: 0, SOT: 1, "a": 2}, merges=[]))
    bad.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="last id"):
        ClipTokenizer.load(tmp_path)
