"""MetaCLIP-style balancing: entry matching on word boundaries, exact decisions against an
independent recomputation of the documented hash draw, the t/count rate, and the same
counts through the whole stage."""
from __future__ import annotations

import hashlib
import math

import pytest

from data_pipeline.filter import FilterConfig, filter_stage
from data_pipeline.filter.balance import EntryMatcher, balance_keep, load_entries
from data_pipeline.filter.config import BalanceConfig
from test_filter_support import distinct_indices, encode, real_image, sample, write_tar


def test_matcher_word_boundaries_case_and_multiword():
    m = EntryMatcher(["cat", "red dress", "t-shirt", "new york", "dress"])
    assert m.match("A Cat on a RED  DRESS") == ["cat", "dress", "red dress"]
    assert m.match("concatenate the cats; dressing up") == []
    assert m.match("blue t-shirt, new-york style") == ["t-shirt"]
    assert m.match("i love new york.") == ["new york"]
    assert EntryMatcher([]).match("anything") == []


def test_entries_from_list_and_file(tmp_path):
    f = tmp_path / "entries.txt"
    f.write_text("Dog\n\n  red   dress \ncat\n")
    assert load_entries(BalanceConfig(entries=["cat", "Sun"], entries_file=str(f))) == ["cat", "sun", "dog", "red dress"]


def reference_draw(seed: int, sha: str, url: str, entry: str) -> float:
    """The draw as documented in BalanceConfig, written out again."""
    digest = hashlib.blake2b(f"{seed}|{sha}|{url}|{entry}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def test_exact_decisions_on_a_constructed_pool():
    t = 10
    caps = (["a rare dress"] * 3  # count 3 <= t: all kept
            + ["a common shirt"] * 40  # count 40 > t: kept with probability 10/40
            + ["a dress and a shirt"] * 2  # dress now has count 5 <= t: kept via dress
            + ["nothing to see here"] * 5)  # no entry
    m = EntryMatcher(["dress", "shirt"])
    matches = [m.match(c) for c in caps]
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(caps))]
    urls = [f"http://x/{i}" for i in range(len(caps))]
    cfg = BalanceConfig(enabled=True, max_per_entry=t, seed=7)
    keep, no_match, counts = balance_keep(matches, shas, urls, cfg)
    assert counts == {"dress": 5, "shirt": 42}
    want = [True] * 3
    want += [reference_draw(7, shas[i], urls[i], "shirt") < t / 42 for i in range(3, 43)]
    want += [True] * 2 + [False] * 5
    assert keep.tolist() == want
    assert no_match.tolist() == [False] * 45 + [True] * 5
    keep2, _, _ = balance_keep(matches, shas, urls, BalanceConfig(enabled=True, max_per_entry=t, seed=7, keep_unmatched=True))
    assert keep2.tolist() == want[:45] + [True] * 5
    again, _, _ = balance_keep(matches, shas, urls, cfg)
    assert (again == keep).all()  # deterministic
    other_seed, _, _ = balance_keep(matches, shas, urls, BalanceConfig(enabled=True, max_per_entry=t, seed=8))
    assert (other_seed[3:43] != keep[3:43]).any()


def test_head_entry_is_capped_near_t():
    n, t = 4000, 200
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    keep, _, _ = balance_keep([["shirt"]] * n, shas, [None] * n, BalanceConfig(enabled=True, max_per_entry=t))
    p = t / n
    assert abs(int(keep.sum()) - t) <= 4 * math.sqrt(n * p * (1 - p))  # binomial(n, t/n)


@pytest.mark.timeout(120)
def test_balancing_inside_the_stage(tmp_path):
    d = distinct_indices(14)
    caps = ["a red dress on a chair"] * 2 + ["a plain white shirt"] * 8 + ["a black ankle boot"] * 2 + ["some other thing"] * 2
    samples = [sample(f"{i:09d}", encode(real_image(d[i])), c) for i, c in enumerate(caps)]
    tar = write_tar(tmp_path / "00000.tar", samples)
    cfg = FilterConfig.from_dict({"balance": {"enabled": True, "entries": ["dress", "shirt", "ankle boot"],
                                              "max_per_entry": 3, "seed": 1}})
    res = filter_stage([tar], str(tmp_path / "w"), cfg)
    shas = [hashlib.sha256(s["parts"]["jpg"]).hexdigest() for s in samples]
    urls = [f"http://example.com/{i:09d}.jpg" for i in range(len(caps))]
    shirt_kept = [i for i in range(2, 10) if reference_draw(1, shas[i], urls[i], "shirt") < 3 / 8]
    assert 0 < len(shirt_kept) < 8  # the case exercises the sampling
    want_kept = [0, 1] + shirt_kept + [10, 11]
    assert res.kept["key"].tolist() == [f"{i:09d}" for i in want_kept]
    assert res.counts == {k: v for k, v in {"filter/balance": 8 - len(shirt_kept), "filter/balance_no_match": 2}.items() if v}
    assert sum(res.counts.values()) + len(res.kept) == res.total_in == len(caps)
    assert res.kept["balance_entries"].map(list).tolist()[:2] == [["dress"], ["dress"]]
    res2 = filter_stage([tar], str(tmp_path / "w2"), cfg)
    assert res2.kept["key"].tolist() == res.kept["key"].tolist()
