"""Independent pure-Python reference of CLIP's tokenizer, for tests and the benchmark only.

It follows the algorithm of OpenAI's ``SimpleTokenizer`` step by step (ftfy + double HTML
unescape, ``\\s+`` collapse with the ``regex`` package, lowercase, CLIP's pre-tokenisation
pattern, byte-to-unicode mapping, greedy lowest-rank BPE merges with a ``</w>`` word end)
without sharing any code with :mod:`pretrain.tokenizer`, so that agreement between the two
is evidence that the fast Rust path is exact. Never used at training time (it is slow).

    from clip_bpe_reference import ReferenceClipTokenizer   # with tests/ on sys.path
    ref = ReferenceClipTokenizer.from_vocab_file(path)
    ref.encode("hello world")       # [3306, 1002]
    ref.tokenize(["a cat"], 77)     # list of 77-id rows with SOT/EOT and zero padding
"""
from __future__ import annotations

import gzip
import html
import json
import random
from pathlib import Path

import ftfy
import regex

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
WORD_END = "</w>"
# Number of merge lines OpenAI's release uses: 49152 - 256 - 2 (the file holds more).
N_OPENAI_MERGES = 49152 - 256 - 2

CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def byte_to_char_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table.

    Printable Latin-1 bytes map to themselves; the 68 others are shifted to 256, 257, ...
    in byte order, so no byte becomes whitespace or a control char.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    # CLIP's vocabulary lists the printable bytes first, then the shifted ones.
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


def adjacent_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def clean(text: str) -> str:
    """CLIP's basic_clean + whitespace_clean + lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ReferenceClipTokenizer:
    def __init__(self, merges: list[tuple[str, str]], token_to_id: dict[str, int] | None = None) -> None:
        self.byte_chars = byte_to_char_table()
        if token_to_id is None:  # OpenAI's layout
            base = list(self.byte_chars.values())
            vocab = base + [c + WORD_END for c in base] + ["".join(m) for m in merges] + [SOT, EOT]
            token_to_id = {t: i for i, t in enumerate(vocab)}
        self.token_to_id = token_to_id
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.token_to_id[SOT]
        self.eot_id = self.token_to_id[EOT]
        self.cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    @classmethod
    def from_vocab_file(cls, path: str | Path, n_merges: int = N_OPENAI_MERGES) -> "ReferenceClipTokenizer":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; merges follow, one "a b" pair per line.
        merges = [tuple(line.split()) for line in lines[1 : n_merges + 1]]
        return cls(merges)  # type: ignore[arg-type]

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "ReferenceClipTokenizer":
        """Vocabulary and merges read straight from a saved ``tokenizer.json``."""
        model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(merges, dict(model["vocab"]))  # type: ignore[arg-type]

    def bpe(self, piece: str) -> list[str]:
        """Greedy BPE: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
        if piece in self.cache:
            return self.cache[piece]
        word = tuple(piece[:-1]) + (piece[-1] + WORD_END,)
        while len(word) > 1:
            candidates = [p for p in adjacent_pairs(word) if p in self.rank]
            if not candidates:
                break
            best = min(candidates, key=self.rank.__getitem__)
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[piece] = list(word)
        return self.cache[piece]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in CLIP_PATTERN.findall(clean(text)):
            mapped = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            ids.extend(self.token_to_id[t] for t in self.bpe(mapped))
        return ids

    def tokenize(self, texts: str | list[str], context_length: int = 77) -> list[list[int]]:
        """SOT + ids truncated to context_length - 2 + EOT, zero padded (open_clip's truncation)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for t in texts:
            ids = [self.sot_id] + self.encode(t)[: context_length - 2] + [self.eot_id]
            rows.append(ids + [0] * (context_length - len(ids)))
        return rows

    def decode(self, ids: list[int]) -> str:
        """CLIP's decode: concatenate tokens, map chars back to bytes, ``</w>`` -> space."""
        inverse = {c: b for b, c in self.byte_chars.items()}
        text = "".join(self.id_to_token[i] for i in ids if i not in (self.sot_id, self.eot_id))
        return bytearray(inverse[c] for c in text).decode("utf-8", errors="replace").replace(WORD_END, " ")


# -- a deterministic corpus of hard, caption-like strings (tests and the benchmark) ---------
_SYLLABLES = "ka lo mi re su ta ne vo pi ra str ing tion ex pre un der over qu zz ph th ch sh".split()
_WORDS = (
    "a an the of on in with and photo picture image view of cat dog man woman child car "
    "house city street beach mountain sunset red blue green black white old new big small "
    "beautiful vintage portrait illustration vector stock background texture wallpaper"
).split()
_SPECIAL = [
    "don't", "I'LL", "it's", "we've", "they're", "I'm", "she'd", "O'Neil", "rock'n'roll",
    "2019", "3.5", "100%", "$9.99", "#tag", "@user", "http://x.com/a_b?c=1&d=2", "e-mail",
    "!!!", "...", "?!", "--", "(", ")", "[1]", "\"quoted\"", "“curly”", "it’s", "¿qué?",
    "&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&amp;amp;", "&nbsp;", "&#x1F600;",
    "café", "über", "naïve", "Straße", "ŁÓDŹ", "ﬁne", "Ｆｕｌｌｗｉｄｔｈ", "ΣΑΣ", "ǅ", "İstanbul",
    "中文字符", "日本語のテキスト", "한국어", "العربية", "русский", "हिन्दी", "ελληνικά", "עברית", "ไทย",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "★★★", "©2020", "™", "½", "²", "٣", "Ⅻ",
    "cafÃ©", "â€™s", "schÃ¶n", "\u200b", "\ufeff", "\x07", "\x1c", "\u0345", "'ſ", "e\u0301",
    "<|endoftext|>", "<|startoftext|>", "!!<|endoftext|>", "<|ENDOFTEXT|>",
]
_SEPARATORS = [" "] * 8 + [", ", ". ", "-"]
_HARD_SEPARATORS = ["  ", "\t", "\n", " \r\n ", "\u3000", "\xa0", ""]


def random_captions(n: int, seed: int = 0, hard_fraction: float = 0.17) -> list[str]:
    """``n`` reproducible captions: common words, pseudo-words (so BPE caches miss), and a
    ``hard_fraction`` of the words drawn from hard cases (contractions, digits, entities,
    scripts, emoji, mojibake, control chars, special-token strings); ~1% are far longer
    than 77 tokens. Separators are mostly single spaces, sometimes other whitespace."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_words = rng.randint(150, 300) if rng.random() < 0.01 else rng.randint(1, 25)
        parts = []
        for _ in range(n_words):
            r = rng.random()
            if r < hard_fraction:
                w = rng.choice(_SPECIAL)
            elif r < hard_fraction + (1 - hard_fraction) / 3:
                w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
            else:
                w = rng.choice(_WORDS)
            case = rng.random()
            w = w.upper() if case < 0.05 else w.capitalize() if case < 0.2 else w
            parts.append(w + rng.choice(_HARD_SEPARATORS if rng.random() < hard_fraction else _SEPARATORS))
        out.append("".join(parts))
    return out
