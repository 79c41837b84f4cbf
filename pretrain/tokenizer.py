"""CLIP's byte-level BPE tokenizer on HF ``tokenizers`` (Rust), reproducing OpenAI's ids exactly.

    from pretrain.tokenizer import ClipTokenizer, default_tokenizer
    tok = default_tokenizer()                      # OpenAI vocab from the local cache, cached
    tok(["a photo of a cat.", "hello world"])      # LongTensor [2, 77]: SOT ids EOT 0 0 ...
    tok("a dog", context_length=16)                # LongTensor [1, 16]
    tok.decode(tok("hello world")[0].tolist())     # 'hello world '

    new = ClipTokenizer.train(captions, vocab_size=8192)   # str items are texts, Path items files
    new.save("out/")                               # writes out/tokenizer.json
    same = ClipTokenizer.load("out/tokenizer.json")

Pipeline (the same as OpenAI's ``SimpleTokenizer``): ``ftfy.fix_text``, ``html.unescape``
twice, strip, collapse Unicode White_Space runs to one space, lowercase (all in Python:
Rust normalizers cannot run ftfy, and Python's ``lower`` is what CLIP uses); then in Rust
via ``encode_batch``: CLIP's pre-tokenisation regex (special tokens, contractions, letter
runs, single digits, symbol runs), byte -> unicode mapping, BPE whose last sub-token of
every pre-token carries ``</w>``. The row is ``<|startoftext|>`` + ids[:ctx-2] +
``<|endoftext|>`` + zero padding, so the end token always survives truncation (open_clip's
rule) and is the highest id of the row (the text tower pools at the argmax id).

A literal ``<|endoftext|>`` in a caption becomes the special id exactly when CLIP's regex
isolates it as one pre-token (CLIP does the same); this rare case is patched after the
Rust pass using the encoding's word ids.

The vocabulary layout is OpenAI's for both the released and trained vocabularies: the
256 byte chars, the same with ``</w>``, one token per merge, then SOT and EOT as the last
two ids. Saved as a plain ``tokenizer.json``; the Python cleaning above is not in that file,
so load it with :meth:`ClipTokenizer.load`. Training is not bit-reproducible across runs
(HF's trainer breaks count ties in hash order): the saved file is the artefact to keep.

Instances pickle (via the JSON) for DataLoader workers. A forked worker whose parent already
used the Rust thread pool runs single-threaded (HF disables it, with a warning unless
TOKENIZERS_PARALLELISM is set).
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import ftfy
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.assets import require_vocab

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
WORD_END = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's release uses the first 49152 - 256 - 2 merge lines of the file (it holds more).
N_OPENAI_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenisation pattern. CLIP compiles it with `regex` and IGNORECASE; on its
# (lowercased) input that flag changes exactly two things, spelled out here because onig's
# (?i) differs: "'ſ" (long s) is a contraction like "'s", and U+0345 (which case-folds to a
# letter) matches neither the letter nor the symbol class, so it is dropped like a space.
CLIP_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'[sSſ]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"
)
# CLIP collapses `regex`'s \s, i.e. the Unicode White_Space property. Python's str.split /
# re's \s also treat U+001C..U+001F as space, so the set is spelled out.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# Printable ASCII without '&' (plus tab/newline): ftfy.fix_text returns such text unchanged
# (no mojibake, entity, control char or width fix can apply), so its ~20 us are skipped.
# tests/test_tokenizer.py checks the identity on random strings.
_FTFY_IDENTITY = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def clean_text(text: str) -> str:
    """CLIP's basic_clean + whitespace_clean + lower, exactly."""
    if not _FTFY_IDENTITY.fullmatch(text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def byte_chars() -> list[str]:
    """The 256 byte chars in CLIP's vocabulary order (printable Latin-1 first, then the rest
    shifted to U+0100.. so that no byte maps to whitespace or a control char)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(shifted))]


def _base_vocab() -> list[str]:
    chars = byte_chars()
    return chars + [c + WORD_END for c in chars]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # invert=True + "removed": keep the regex matches, drop what lies between (spaces),
    # i.e. re.findall semantics.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    # No unk token: every byte char is in the vocabulary, so nothing can be unknown.
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=WORD_END))
    tk.pre_tokenizer = _pre_tokenizer()
    # CLIP's decode: bytes back from chars, then every "</w>" becomes a space.
    tk.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(WORD_END, " ")])
    return tk


def _layout(merges: Iterable[tuple[str, str]], max_size: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI layout: base chars, merge results (in merge order), then SOT, EOT last."""
    tokens = _base_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if max_size is not None and len(vocab) >= max_size - 2:
            break
        kept.append((a, b))
        vocab.setdefault(a + b, len(vocab))  # two merges may build the same string
    vocab[SOT] = len(vocab)
    vocab[EOT] = len(vocab)
    return vocab, kept


def _texts_from(items: Iterable[str | os.PathLike]) -> Iterator[str]:
    for item in items:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8", errors="replace") as f:
                for line in f:
                    yield clean_text(line)
        elif isinstance(item, str):
            yield clean_text(item)
        else:
            raise TypeError(f"train() takes str texts or os.PathLike files, got {type(item).__name__}")


class ClipTokenizer:
    """CLIP tokenizer: ``tok(texts, context_length=77) -> LongTensor[N, context_length]``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        sot, eot = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
        size = tokenizer.get_vocab_size()
        if sot is None or eot is None:
            raise ValueError(f"tokenizer has no {SOT} / {EOT} token")
        if eot != size - 1:
            # The text tower pools at the highest id of each row; that must be the EOT.
            raise ValueError(f"{EOT} must be the last id ({size - 1}), found {eot}")
        self._tk = tokenizer
        self.sot_token_id: int = sot
        self.eot_token_id: int = eot
        self.vocab_size: int = size
        self._specials = {SOT: sot, EOT: eot}

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_openai_vocab(cls, path: str | os.PathLike | None = None) -> "ClipTokenizer":
        """From OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (None: the project's cached copy)."""
        if path is None:
            path = require_vocab()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : N_OPENAI_MERGES + 1]  # line 0 is a header
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != N_OPENAI_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not OpenAI's BPE merges file (expected {N_OPENAI_MERGES} 'a b' lines)")
        vocab, kept = _layout(merges)  # type: ignore[arg-type]
        return cls(_build(vocab, kept))

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str | os.PathLike],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> "ClipTokenizer":
        """Learn a new BPE vocabulary of ``vocab_size`` ids (base 512 + merges + SOT/EOT).

        ``str`` items are texts; ``os.PathLike`` items are UTF-8 files, one text a line.
        The same cleaning and pre-tokenisation as OpenAI's vocabulary apply. A corpus with
        fewer mergeable pairs than asked gives a smaller vocabulary (with a warning).
        """
        n_base = len(_base_vocab())
        if vocab_size < n_base + 2:
            raise ValueError(f"vocab_size must be >= {n_base + 2} (256 bytes x 2 + SOT/EOT), got {vocab_size}")
        tk = Tokenizer(models.BPE(end_of_word_suffix=WORD_END))
        tk.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(
            # The trainer counts its own alphabet (<= 512) in vocab_size: ask for enough
            # merges, the layout keeps the first ones.
            vocab_size=vocab_size - 2 + n_base,
            min_frequency=min_frequency,
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=WORD_END,
            special_tokens=[],
        )
        tk.train_from_iterator(_texts_from(texts_or_files), trainer=trainer)
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tk.to_str())["model"]["merges"]]
        vocab, kept = _layout(merges, max_size=vocab_size)  # type: ignore[arg-type]
        if len(vocab) < vocab_size:
            warnings.warn(f"corpus gave only {len(vocab)} of the {vocab_size} ids asked for", stacklevel=2)
        return cls(_build(vocab, kept))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` is that file or a directory for it); returns it."""
        p = Path(path)
        if p.suffix != ".json":
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(p))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """Load a ``tokenizer.json`` written by :meth:`save` (file or its directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        return cls(Tokenizer.from_file(str(p)))

    # -- pickling (DataLoader workers) ---------------------------------------------------
    def __getstate__(self) -> dict:
        return {"tokenizer_json": self._tk.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["tokenizer_json"]))  # type: ignore[misc]

    # -- encoding ------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Content ids of each text (no SOT/EOT, no truncation)."""
        cleaned = [clean_text(t) for t in texts]
        encs = self._tk.encode_batch(cleaned, add_special_tokens=False)
        out = []
        for text, enc in zip(cleaned, encs):
            if "<|" in text and (SOT in text or EOT in text):
                out.append(self._with_specials(text, enc))
            else:
                out.append(enc.ids)
        return out

    def _with_specials(self, text: str, enc) -> list[int]:
        """Replace the BPE pieces of every pre-token that is exactly SOT/EOT by its id."""
        ids, words, offsets = enc.ids, enc.word_ids, enc.offsets
        out: list[int] = []
        i = 0
        while i < len(ids):
            j = i
            while j < len(ids) and words[j] == words[i]:
                j += 1
            piece = text[offsets[i][0] : offsets[j - 1][1]]
            if piece in self._specials:
                out.append(self._specials[piece])
            else:
                out.extend(ids[i:j])
            i = j
        return out

    def __call__(self, texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """``LongTensor[N, context_length]``: SOT, ids[:ctx-2], EOT, zero padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        keep = context_length - 2
        encoded = self.encode(list(texts))
        # Filling a numpy array row by row is ~6x faster than torch.tensor(list of lists).
        out = np.zeros((len(encoded), context_length), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        for i, ids in enumerate(encoded):
            n = min(len(ids), keep)
            out[i, 1 : n + 1] = ids[:n]
            out[i, n + 1] = self.eot_token_id
        return torch.from_numpy(out)

    def decode(self, ids: list[int]) -> str:
        """CLIP's decode of one row: SOT, EOT and anything after the EOT are dropped."""
        ids = list(ids)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return self._tk.decode([i for i in ids if i != self.sot_token_id], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The OpenAI-vocabulary tokenizer, built once per process."""
    return ClipTokenizer.from_openai_vocab()
