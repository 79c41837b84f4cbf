"""Tokenizer throughput: the HF-tokenizers fast path against the pure-Python CLIP reference.

    .venv/bin/python benchmarks/bench_tokenizer.py [--n 100000] [--ref-n 10000]
        [--batch-size 1024] [--context-length 77] [--seed 0] [--hard-fractions 0.17 0.02]

Captions come from ``tests/clip_bpe_reference.random_captions`` (deterministic: common words,
pseudo-words that miss BPE caches, a given share of hard unicode/entity/emoji/whitespace
cases, ~1% longer than 77 tokens); one corpus per --hard-fractions value. Rows:
  fast, batched          ClipTokenizer(list of --batch-size captions) over all --n captions
  fast, per caption      ClipTokenizer(one caption), as a Dataset.__getitem__ calls it
  of which clean_text    the Python part of the fast path (ftfy + HTML + whitespace + lower);
                         ftfy is skipped only for printable ASCII without '&'
  reference              tests/clip_bpe_reference.py (OpenAI's algorithm in pure Python,
                         fresh BPE cache) on the first --ref-n captions; the ratio column
                         compares captions/s
The reference's ids are checked equal to the fast path's on its subset. Numbers depend on
the machine's load (the Rust encoder uses every core unless RAYON_NUM_THREADS is set);
compare rows of one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from clip_bpe_reference import ReferenceClipTokenizer, random_captions  # noqa: E402

from pretrain.assets import require_vocab  # noqa: E402
from pretrain.tokenizer import ClipTokenizer, clean_text  # noqa: E402


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="captions for the fast path")
    ap.add_argument("--ref-n", type=int, default=10_000, help="captions for the (slow) reference")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--context-length", type=int, default=77)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard-fractions", type=float, nargs="+", default=[0.17, 0.02],
                    help="share of hard words per corpus (0.17: the test mix; 0.02: ~75%% pure-ASCII captions)")
    args = ap.parse_args(argv)
    if min(args.n, args.ref_n, args.batch_size) < 1 or args.ref_n > args.n:
        ap.error("need 1 <= --ref-n <= --n and --batch-size >= 1")

    tok = ClipTokenizer.from_openai_vocab()
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')} "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    ok = True
    for frac in args.hard_fractions:
        ok &= run_corpus(tok, random_captions(args.n, seed=args.seed, hard_fraction=frac), frac, args)
    return 0 if ok else 1


def run_corpus(tok: ClipTokenizer, captions: list[str], frac: float, args: argparse.Namespace) -> bool:
    ctx, bs, n = args.context_length, args.batch_size, len(captions)
    ascii_share = sum(map(str.isascii, captions)) / n
    print(f"\n== hard_fraction={frac}: {n} captions, mean {sum(map(len, captions)) / n:.0f} chars, "
          f"{ascii_share:.0%} pure ASCII")
    tok(captions[:256], ctx)  # warm-up: thread pool start, first allocations
    rows: list[tuple[str, int, float]] = []
    dt, _ = timed(lambda: [tok(captions[i : i + bs], ctx) for i in range(0, n, bs)])
    rows.append((f"fast, batched ({bs})", n, dt))
    dt, _ = timed(lambda: [tok(c, ctx) for c in captions])
    rows.append(("fast, per caption", n, dt))
    dt, _ = timed(lambda: [clean_text(c) for c in captions])
    rows.append(("  of which clean_text", n, dt))

    subset = captions[: args.ref_n]
    ref_tok = ReferenceClipTokenizer.from_vocab_file(require_vocab())  # empty BPE cache
    dt, ref_ids = timed(lambda: ref_tok.tokenize(subset, ctx))
    rows.append(("reference (pure Python)", len(subset), dt))
    same = tok(subset, ctx).tolist() == ref_ids

    ref_rate = len(subset) / dt
    print(f"{'mode':<26}{'captions':>10}{'seconds':>10}{'captions/s':>13}{'x reference':>13}")
    for name, count, secs in rows:
        print(f"{name:<26}{count:>10}{secs:>10.2f}{count / secs:>13,.0f}{count / secs / ref_rate:>12.1f}x")
    print(f"ids identical to the reference on {len(subset)} captions: {'yes' if same else 'NO'}")
    return same


if __name__ == "__main__":
    raise SystemExit(main())
