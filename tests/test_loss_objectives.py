"""The captioning and bag-of-words objectives (the CLIP paper's Figure 2 baselines): their
losses against plain per-caption computations written here, their models' targets and
likelihoods, the zero-shot scoring and the run-config dispatch; the distributed
normalisation with 2 gloo ranks holding unequal shares of the batch.

Run: `.venv/bin/python -m pytest -q tests/test_loss_objectives.py`.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dist_harness import run_distributed
from pretrain.loss import bow_loss, captioning_loss, get_loss, objective_of
from pretrain.models import bag_of_words, caption_targets, create_model

VOCAB = 50
SOT, EOT = VOCAB - 2, VOCAB - 1


def token_rows(n: int, ctx: int = 12, seed: int = 0) -> torch.Tensor:
    """CLIP-style rows: SOT, 0..ctx-3 word ids (< SOT, repeats likely), EOT, zero padding.
    Row 1 is an empty caption (SOT EOT)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        k = 0 if i == 1 else int(torch.randint(1, ctx - 2, (1,), generator=g))
        words = torch.randint(0, 8, (k,), generator=g)  # few distinct ids: repeated words
        rows[i, : k + 2] = torch.cat([torch.tensor([SOT]), words, torch.tensor([EOT])])
    return rows


def ref_caption_nll(logits_per_row: list[torch.Tensor], rows: torch.Tensor) -> float:
    """Mean over every predicted token (words and EOT) of -log p, one row at a time."""
    total, count = 0.0, 0
    for lg, row in zip(logits_per_row, rows.tolist()):
        end = row.index(EOT)
        for j in range(end):  # position j predicts row[j + 1]
            p = torch.exp(lg[j].double()) / torch.exp(lg[j].double()).sum()
            total -= math.log(float(p[row[j + 1]]))
            count += 1
    return total / count


def ref_bow(word_logits: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean over captions with words of -sum_w (count_w / n_words) log softmax(logits)_w."""
    losses = []
    for lg, row in zip(word_logits.double(), rows.tolist()):
        words = row[1:row.index(EOT)]
        if not words:
            continue
        logp = lg - torch.log(torch.exp(lg).sum())
        losses.append(-sum(c / len(words) * float(logp[w]) for w, c in Counter(words).items()))
    return sum(losses) / len(losses)


def test_captioning_loss_is_the_token_mean_cross_entropy():
    rows = token_rows(6)
    model = create_model("ViT-tiny", objective="captioning", image_size=32, vocab_size=VOCAB,
                         context_length=12, text_width=32, text_layers=1)
    images = torch.randn(6, 3, 32, 32)
    logits, targets = model(images, rows)
    n_targets = sum(r.index(EOT) for r in rows.tolist())
    assert logits.shape == (n_targets, VOCAB) and targets.shape == (n_targets,)
    # the same decoder run on each full row alone, all positions, no selection
    per_row = []
    with torch.no_grad():
        for i in range(6):
            h = model.text_decoder(rows[i:i + 1, :-1], model.image_tokens(images[i:i + 1]))
            per_row.append(model.text_decoder.logits(h)[0])
    loss = captioning_loss(logits, targets)
    assert float(loss.detach()) == pytest.approx(ref_caption_nll(per_row, rows), rel=1e-5)
    # the likelihood used by zero-shot scoring: the same per-token log-probabilities, summed per row
    with torch.no_grad():
        lp = model.caption_logprob(model.image_tokens(images), rows)
    assert float(-lp.sum()) / n_targets == pytest.approx(float(loss), rel=1e-5)


def test_caption_targets_cut_to_the_longest_caption_and_stop_at_eot():
    rows = token_rows(4)
    inputs, targets, valid = caption_targets(rows)
    longest = max(r.index(EOT) for r in rows.tolist()) + 1
    assert inputs.shape == targets.shape == valid.shape == (4, longest - 1)
    for i, r in enumerate(rows.tolist()):
        assert targets[i][valid[i]].tolist() == r[1:r.index(EOT) + 1]


def test_bow_loss_is_the_softmax_cross_entropy_of_the_normalised_bag():
    rows = token_rows(7, seed=3)
    logits = torch.randn(7, VOCAB)
    assert float(bow_loss(logits, rows)) == pytest.approx(ref_bow(logits, rows), rel=1e-6)
    bag = bag_of_words(rows, VOCAB)
    assert bag[1].sum() == 0  # the empty caption has no target
    row0 = rows[0].tolist()
    words = row0[1:row0.index(EOT)]
    for w, c in Counter(words).items():
        assert float(bag[0, w]) == pytest.approx(c / len(words))
    assert float(bag[0].sum()) == pytest.approx(1.0)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="no caption token"):
        captioning_loss(torch.zeros(0, VOCAB), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        captioning_loss(torch.zeros(3, VOCAB), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no caption of the global batch has a word"):
        bow_loss(torch.zeros(1, VOCAB), torch.tensor([[SOT, EOT, 0]]))
    with pytest.raises(ValueError, match="token ids"):
        bag_of_words(torch.tensor([[SOT, VOCAB + 3, EOT]]), VOCAB)


def test_losses_are_chosen_by_the_run_config_and_build_their_model():
    from pretrain.config import load_config
    from pretrain.train.build import build_model

    assert get_loss("captioning") is captioning_loss and get_loss("bow") is bow_loss
    assert [objective_of(n) for n in ("clip", "siglip", "captioning", "bow")] == \
        ["contrastive", "contrastive", "captioning", "bow"]
    base = ["--output_dir=/nonexistent", "--data.sources=/nonexistent/{0..1}.tar", "--data.samples_per_epoch=64",
            "--model.name=ViT-tiny", "--model.overrides.image_size=32"]
    for loss, attr in (("captioning", "text_decoder"), ("bow", "bow_head"), ("clip", "text_projection")):
        model = build_model(load_config(None, base + [f"--train.loss={loss}"]))
        assert hasattr(model, attr), loss
    # the contrastive model's state-dict keys are unchanged by the new objectives
    keys = set(build_model(load_config(None, base)).state_dict())
    assert not any(k.startswith(("text_decoder", "bow_head")) for k in keys)
    assert {"logit_scale", "text_projection", "visual.proj", "token_embedding.weight"} <= keys
    with pytest.raises(ValueError, match="grad_cache"):
        load_config(None, base + ["--train.loss=bow", "--train.grad_cache=true"])
    with pytest.raises(ValueError, match="retrieval_dataset"):
        load_config(None, base + ["--train.loss=captioning", "--eval.retrieval_dataset=captions:/x/{0..1}.tar"])


def test_zeroshot_scores_follow_the_prompt_likelihoods():
    """Scores against a plain per-image, per-prompt computation (no shared-prefix reuse, no
    batching), on a tiny labelled set."""
    from pretrain.eval.generative import generative_zeroshot_scores
    from pretrain.tokenizer import default_tokenizer

    class Tiny(torch.utils.data.Dataset):
        name, classnames, transform = "tiny", ["sneaker", "ankle boot", "bag"], None
        labels = torch.tensor([0, 1, 2, 1]).numpy()

        def set_image_size(self, size):
            self.transform = size

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i

    tok = default_tokenizer()
    temps = ["a photo of a {}.", "a {} in a shop window"]
    cap = create_model("ViT-tiny", objective="captioning", image_size=32).eval()
    bow = create_model("ViT-tiny", objective="bow", image_size=32).eval()
    ds = Tiny()
    s_cap, idx, skipped = generative_zeroshot_scores(cap, tok, ds, temps, batch_size=3, rows_per_pass=5)
    s_bow, _, _ = generative_zeroshot_scores(bow, tok, ds, temps, batch_size=3)
    assert idx.tolist() == [0, 1, 2, 3] and skipped == 0 and s_cap.shape == s_bow.shape == (4, 3)
    with torch.no_grad():
        for i in range(4):
            img = ds[i][0].unsqueeze(0)
            mem = cap.image_tokens(img)
            logq = torch.log_softmax(bow.word_logits(img)[0].double(), dim=-1)
            for c, name in enumerate(ds.classnames):
                prompts = tok([t.format(name) for t in temps], context_length=77)
                lps = [float(cap.caption_logprob(mem, prompts[k:k + 1])) for k in range(len(temps))]
                ref = math.log(sum(math.exp(v) for v in lps) / len(temps))
                assert float(s_cap[i, c]) == pytest.approx(ref, rel=1e-4, abs=1e-3)
                bow_ref = 0.0
                for row in prompts.tolist():
                    words = row[1:row.index(max(row))]
                    bow_ref += sum(float(logq[w]) for w in words) / len(words) / len(temps)
                assert float(s_bow[i, c]) == pytest.approx(bow_ref, rel=1e-5)


# --- 2 ranks: each rank holds an unequal share of the global batch ---------------------
SPLIT = (3, 5)


def _dist_work(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    rows = token_rows(sum(SPLIT), seed=5)
    cap_logits = torch.randn(sum(r.index(EOT) for r in rows.tolist()), VOCAB)
    word_logits = torch.randn(sum(SPLIT), VOCAB)
    lo = sum(SPLIT[:rank])
    mine = slice(lo, lo + SPLIT[rank])
    # this rank's caption positions: those of its rows
    n_before = sum(r.index(EOT) for r in rows[:lo].tolist())
    n_mine = sum(r.index(EOT) for r in rows[mine].tolist())
    cl = cap_logits[n_before:n_before + n_mine].clone().requires_grad_(True)
    _, targets, valid = caption_targets(rows[mine])
    c_loss = captioning_loss(cl, targets[valid])
    (c_loss / world).backward()  # DDP/DeepSpeed average the ranks' gradients
    wl = word_logits[mine].clone().requires_grad_(True)
    b_loss = bow_loss(wl, rows[mine])
    (b_loss / world).backward()
    return {"cap": float(c_loss), "bow": float(b_loss), "cap_grad": cl.grad, "bow_grad": wl.grad,
            "rows": rows, "cap_logits": cap_logits, "word_logits": word_logits}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_equal_the_full_batch():
    r0, r1 = run_distributed(_dist_work, 2)
    rows = r0["rows"]
    # the full batch in one process
    cl = r0["cap_logits"].clone().requires_grad_(True)
    _, targets, valid = caption_targets(rows)
    full_cap = captioning_loss(cl, targets[valid])
    full_cap.backward()
    wl = r0["word_logits"].clone().requires_grad_(True)
    full_bow = bow_loss(wl, rows)
    full_bow.backward()
    assert (r0["cap"] + r1["cap"]) / 2 == pytest.approx(float(full_cap), rel=1e-6)
    assert (r0["bow"] + r1["bow"]) / 2 == pytest.approx(float(full_bow), rel=1e-6)
    assert float(full_bow) == pytest.approx(ref_bow(r0["word_logits"], rows), rel=1e-6)
    torch.testing.assert_close(torch.cat([r0["cap_grad"], r1["cap_grad"]]), cl.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([r0["bow_grad"], r1["bow_grad"]]), wl.grad, rtol=1e-5, atol=1e-7)
