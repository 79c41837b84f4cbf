"""The training loader on real shards (Fashion-MNIST / MNIST images with class captions):
shapes, fixed step counts across simulated ranks and workers, determinism, exact resume,
bad-sample skipping, weighted source mixing and manifest input.

    .venv/bin/python -m pytest -q tests/test_data_loader.py
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from shard_factory import make_caption_shards

import pretrain.data.loader as loader_mod
import pretrain.data.tar_reader as tar_reader
from pretrain.data import DataSource, expand_sources, make_train_loader, sample_rng, train_transform

S = 32  # image_size used throughout: shards hold 48 px JPEGs, so the crop is a real resize


class ByteTokenizer:
    """A picklable stand-in: UTF-8 bytes + 1, zero padded (keeps these tests independent of
    the BPE tokenizer; one test below uses the real one)."""

    def __call__(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = list(t.encode("utf-8"))[:context_length]
            out[i, : len(ids)] = torch.tensor(ids) + 1
        return out


TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data_loader")
    return {
        "uneven": make_caption_shards(root / "uneven", 4, [40, 13, 27, 8], image_px=48),
        "single": make_caption_shards(root / "single", 1, 24, image_px=48, seed=1),
        "bad": make_caption_shards(root / "bad", 3, [20, 20, 20], image_px=48, seed=2,
                                   corrupt={"jpeg": [3, 25], "missing_txt": [7], "truncate": [2]}),
        "digits": make_caption_shards(root / "digits", 2, 30, image_px=48, dataset="mnist5k"),
    }


def load(pattern, **kw) -> list[dict]:
    args = dict(tokenizer=TOK, image_size=S, micro_batch=8, num_workers=0, seed=0, epoch=0,
                rank=0, world_size=1, steps=6, shuffle_buffer=30, return_keys=True)
    args.update(kw)
    sources = pattern if isinstance(pattern, list) else [DataSource(str(pattern))]
    return list(make_train_loader(sources, **args))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["images"], y["images"]) and torch.equal(x["tokens"], y["tokens"])
        and int(x["skipped"]) == int(y["skipped"]) and x["keys"] == y["keys"] for x, y in zip(a, b))


def read_member(shard_url: str, key: str, ext: str) -> bytes:
    with tarfile.open(shard_url) as tar:
        return tar.extractfile(f"{key}.{ext}").read()


@pytest.mark.timeout(60)
def test_batches_shapes_and_content_with_real_tokenizer(data):
    from pretrain.tokenizer import default_tokenizer

    tok = default_tokenizer()
    shards = data["uneven"]
    batches = load(shards.pattern, tokenizer=tok, steps=2, crop_scale=(0.5, 1.0))
    assert len(batches) == 2
    caption_of = dict(zip(shards.keys, shards.captions))
    tf = train_transform(S, (0.5, 1.0))
    for b in batches:
        assert b["images"].shape == (8, 3, S, S) and b["images"].dtype == torch.float32
        assert b["tokens"].shape == (8, 77) and b["tokens"].dtype == torch.long
        assert b["skipped"].shape == () and b["skipped"].dtype == torch.long and int(b["skipped"]) == 0
        assert len(set(b["keys"])) == 8
        for i, full_key in enumerate(b["keys"]):
            url, key = full_key.split("#")
            # Tokens are the caption of that very sample; the image is the documented
            # transform of its JPEG with the RNG of (seed, epoch, key).
            assert torch.equal(b["tokens"][i], tok([caption_of[key]])[0])
            expect = tf(read_member(url, key, "jpg"), sample_rng(0, 0, full_key))
            assert torch.equal(b["images"][i], expect)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("which", ["single", "uneven"])
def test_two_ranks_two_workers_get_exact_steps(data, resampled, which):
    # 1 shard for 2 ranks x 2 workers, or 4 uneven shards: every rank still gets `steps`.
    keys = {}
    for rank in (0, 1):
        loader = make_train_loader([DataSource(data[which].pattern)], tokenizer=TOK, image_size=S,
                                   micro_batch=8, num_workers=2, seed=3, epoch=0, rank=rank,
                                   world_size=2, steps=7, resampled=resampled, shuffle_buffer=20,
                                   return_keys=True)
        assert len(loader) == 7
        batches = list(loader)
        assert len(batches) == 7
        assert all(b["images"].shape == (8, 3, S, S) for b in batches)
        keys[rank] = [b["keys"] for b in batches]
    assert keys[0] != keys[1]
    if which == "uneven" and not resampled:
        # Epoch-wise: 4 shards over 2 ranks x 2 workers -> every stream reads its own shard.
        shards = {r: {k.split("#")[0] for ks in keys[r] for k in ks} for r in (0, 1)}
        assert not shards[0] & shards[1]


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers,steps,start", [(0, 5, 0), (2, 5, 0), (2, 1, 0), (2, 4, 4), (3, 5, 2)])
def test_exact_step_count(data, num_workers, steps, start):
    batches = load(data["uneven"].pattern, num_workers=num_workers, steps=steps, start_step=start)
    assert len(batches) == steps - start


@pytest.mark.timeout(60)
def test_determinism_and_variation(data):
    pattern = data["uneven"].pattern
    base = load(pattern, num_workers=2)
    assert same(base, load(pattern, num_workers=2))  # same (seed, epoch, rank) -> identical
    assert base[0]["keys"] != base[1]["keys"]  # the two workers' streams differ
    for other in (dict(epoch=1), dict(rank=1, world_size=2), dict(seed=1)):
        assert [b["keys"] for b in load(pattern, num_workers=2, **other)] != [b["keys"] for b in base]
    # A sample drawn again in another epoch gets another crop (augmentation keyed by epoch).
    # The key includes the shard's path (a fresh temporary directory per session), so the
    # draws differ between sessions: on these small images two epochs can pick the same box
    # for one sample now and then, never for a whole batch.
    tf = train_transform(S, (0.5, 1.0))
    changed = []
    for full_key in base[0]["keys"]:
        url, key = full_key.split("#")
        jpg = read_member(url, key, "jpg")
        changed.append(not torch.equal(tf(jpg, sample_rng(0, 0, full_key)), tf(jpg, sample_rng(0, 1, full_key))))
    assert sum(changed) >= len(changed) // 2, changed


@pytest.mark.timeout(90)
@pytest.mark.parametrize("resampled", [True, False])
def test_resume_equals_tail_of_uninterrupted_run(data, resampled):
    # On the shards with bad samples: replacements and skip counts must resume exactly too.
    pattern = data["bad"].pattern
    full = load(pattern, num_workers=2, steps=9, resampled=resampled)
    for k in (3, 4):
        tail = load(pattern, num_workers=2, steps=9, start_step=k, resampled=resampled)
        assert same(tail, full[k:]), f"start_step={k}"


@pytest.mark.timeout(60)
def test_resume_skips_without_decoding(data, monkeypatch):
    calls = []
    real = loader_mod.train_transform

    def counting(*a, **kw):
        f = real(*a, **kw)
        return lambda img, rng, out=None: (calls.append(1), f(img, rng, out))[1]

    reads = []
    real_read = tar_reader.MemberRef.read
    monkeypatch.setattr(loader_mod, "train_transform", counting)
    monkeypatch.setattr(tar_reader.MemberRef, "read", lambda self: (reads.append(1), real_read(self))[1])
    batches = load(data["uneven"].pattern, num_workers=0, steps=10, start_step=7, shuffle_buffer=30)
    assert len(batches) == 3
    assert len(calls) == 3 * 8  # only the yielded batches were decoded
    # The 56 skipped samples were passed by their tar headers: only samples still in the
    # shuffle buffer after the fast-forward (<= 30, image + caption each) were read back.
    assert 0 < len(reads) <= 2 * 30


@pytest.mark.timeout(60)
def test_streamed_sources_resume_too(data):
    # pipe: (and fsspec) URLs are streamed and read eagerly: same guarantees.
    shards = data["bad"]
    pattern = "pipe:cat " + shards.pattern
    full = load(pattern, num_workers=2, steps=7)
    assert same(load(pattern, num_workers=2, steps=7, start_step=3), full[3:])
    seen = {k.split("#")[1] for b in full for k in b["keys"]}
    assert seen and not seen & set(shards.corrupted_keys)
    assert sum(int(b["skipped"]) for b in full) > 0


@pytest.mark.timeout(60)
def test_bad_samples_are_skipped_and_counted(data):
    shards = data["bad"]
    batches = load(shards.pattern, num_workers=2, steps=12)
    assert len(batches) == 12
    seen = {k.split("#")[1] for b in batches for k in b["keys"]}
    assert not seen & set(shards.corrupted_keys)
    assert sum(int(b["skipped"]) for b in batches) > 0
    # The truncated shard still delivers the samples before the damage.
    truncated = str(shards.shard_paths[2])
    assert any(k.startswith(truncated + "#") for b in batches for k in b["keys"])
    assert all(torch.isfinite(b["images"]).all() for b in batches)
    # Each bad sample met is counted: a corrupt JPEG is only found by decoding it.
    loader = make_train_loader([DataSource(shards.pattern)], tokenizer=TOK, image_size=S,
                               micro_batch=60, num_workers=0, seed=0, epoch=0, rank=0,
                               world_size=1, steps=1, resampled=False, shuffle_buffer=1)
    (b,) = list(loader)
    # 60 raw samples, one epoch-wise pass: the truncated shard (1 read error) and the sample
    # without caption (1) are met while reading; the decode finds the corrupt JPEGs among them.
    assert int(b["skipped"]) >= 2 and loader.skipped_total() == int(b["skipped"])


@pytest.mark.timeout(60)
def test_unreadable_data_raises_instead_of_hanging(tmp_path):
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(RuntimeError, match="no readable sample"):
        load(str(bad), steps=1)


@pytest.mark.timeout(60)
def test_weighted_mix_proportions(data):
    a, b = data["uneven"], data["digits"]
    batches = load([DataSource(a.pattern, 3.0), DataSource(b.pattern, 1.0)], micro_batch=16,
                   steps=40, image_size=16, shuffle_buffer=10)
    urls = [k.split("#")[0] for batch in batches for k in batch["keys"]]
    frac_a = sum(u.startswith(str(Path(a.pattern).parent)) for u in urls) / len(urls)
    assert abs(frac_a - 0.75) < 0.05, frac_a  # 640 draws: 3 standard deviations = 0.05


@pytest.mark.timeout(60)
def test_manifest_and_joined_patterns(data):
    shards = data["uneven"]
    assert expand_sources([DataSource(str(shards.manifest))]) == [[str(p) for p in shards.shard_paths]]
    assert same(load(str(shards.manifest)), load(shards.pattern))
    joined = f"{data['single'].pattern}::{shards.pattern}"
    assert expand_sources([DataSource(joined)])[0] == [str(data["single"].shard_paths[0])] + [
        str(p) for p in shards.shard_paths]


def test_bad_arguments_are_rejected(data, tmp_path):
    with pytest.raises(ValueError):
        DataSource("x.tar", weight=0)
    with pytest.raises(ValueError):
        expand_sources([])
    with pytest.raises(ValueError, match="manifest"):
        expand_sources([DataSource(str(tmp_path / "missing" / "manifest.json"))])
    with pytest.raises(ValueError):
        load(data["single"].pattern, steps=3, start_step=4)
    with pytest.raises(ValueError):
        load(data["single"].pattern, rank=2, world_size=2)


@pytest.mark.timeout(60)
def test_fsspec_urls_and_remote_manifest(data):
    import fsspec

    shards = data["uneven"]
    fs = fsspec.filesystem("memory")
    for p in shards.shard_paths:
        fs.pipe(f"/clipdata/shards/{p.name}", p.read_bytes())
    fs.pipe("/clipdata/manifest.json", shards.manifest.read_bytes())
    urls = expand_sources([DataSource("memory://clipdata/manifest.json")])[0]
    assert urls == [f"memory://clipdata/shards/{p.name}" for p in shards.shard_paths]
    # Epoch-wise over 88 samples: no sample repeats, so the order depends only on the seeds
    # (crops differ: they are keyed by the full URL).
    remote = load("memory://clipdata/manifest.json", steps=3, resampled=False)
    local = load(shards.pattern, steps=3, resampled=False)
    assert [[k.split("#")[1] for k in b["keys"]] for b in remote] == \
        [[k.split("#")[1] for k in b["keys"]] for b in local]


@pytest.mark.timeout(60)
def test_epoch_end_leaves_no_queue_feeder_thread(data):
    # The next epoch forks its workers right away; a feeder thread still exiting at that
    # moment deadlocks the forked child on CPython < 3.12 (a hung demo run was traced to it).
    import threading

    def feeders():
        return {t for t in threading.enumerate() if t.name == "QueueFeederThread"}

    before = feeders()
    for epoch in range(2):
        assert len(load(data["uneven"].pattern, num_workers=2, epoch=epoch, steps=3)) == 3
        assert feeders() - before == set()
