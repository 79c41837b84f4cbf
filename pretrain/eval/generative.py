"""Zero-shot classification of the captioning and bag-of-words models, as the CLIP paper
scores its baselines (arXiv 2103.00020, Section 2.3, Figure 2): every class prompt (class
name x template, the same prompt ensembles as the contrastive path, templates.py) is
scored by the model, and the class with the highest ensembled score wins.

- captioning: score(class) = log mean_t p(prompt_t(class) | image), the likelihood of the
  whole prompt text (every token and the EOT) under the decoder, averaged over the
  templates in probability (a mixture over the ensemble; logsumexp - log T);
- bag of words: score(class) = sum_w bag(w) log p(w | image), with bag the class prompts'
  normalised bags of words averaged over the templates: the negated training loss of the
  ensemble's mean bag (being linear in the bag, it equals the mean of the per-template
  scores).

    from pretrain.eval.generative import generative_zeroshot_scores
    scores, indices, skipped = generative_zeroshot_scores(model, tokenizer, ds, templates)
    # scores [M, C] float32, rows for dataset items `indices`

The contrastive models go through api.py (embeddings); `zeroshot_eval` dispatches on
``model.objective``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.eval.datasets import EvalDataset
from pretrain.eval.features import autocast_for, image_batches, model_device
from pretrain.eval.templates import resolve_templates
from pretrain.models import bag_of_words

log = logging.getLogger(__name__)

GENERATIVE_OBJECTIVES = ("captioning", "bow")


def objective(model: torch.nn.Module) -> str:
    """The model's training objective ("contrastive" for CLIP models without the attribute)."""
    return str(getattr(model, "objective", "contrastive"))


def _prompt_tokens(model, tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                   templates: Sequence[str], device: torch.device) -> torch.Tensor:
    if not classnames:
        raise ValueError("no class names")
    texts = [t.replace("{}", c) for c in classnames for t in templates]  # class-major order
    return tokenizer(texts, context_length=int(model.context_length)).to(device)


def bow_class_bags(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                   device: torch.device) -> torch.Tensor:
    """[C, vocab]: each class's prompts' normalised bags averaged over the templates."""
    tokens = _prompt_tokens(model, tokenizer, classnames, templates, device)
    bags = bag_of_words(tokens, int(model.vocab_size))
    return bags.view(len(classnames), len(templates), -1).mean(dim=1)


def shared_positions(prompts: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """[C*T, L-1] bool: position j of a prompt is shared when every class's prompt of the
    same template has the same tokens up to j + 1 (input and target): its log-probability
    is the same for all classes ("a photo of a" before the class name) and is computed once,
    from class 0's row."""
    grid = prompts.view(n_classes, n_templates, -1)
    same = (grid == grid[:1]).all(dim=0)  # (T, L): token k equal across classes
    common = torch.cumprod(same.to(torch.int64), dim=1).bool()  # tokens[:k + 1] equal
    shared = common[:, 1:]  # position j: tokens[:j + 2]
    return shared.unsqueeze(0).expand(n_classes, -1, -1).reshape(n_classes * n_templates, -1)


def _captioning_scores(model, images: torch.Tensor, prompts: torch.Tensor, n_classes: int,
                       n_templates: int, rows_per_pass: int) -> torch.Tensor:
    """[b, C]: log mean_t p(prompt | image) of every image against every prompt."""
    memory = model.image_tokens(images)  # (b, N, D), once per image
    b, p = memory.shape[0], prompts.shape[0]
    shared = shared_positions(prompts, n_classes, n_templates)  # (P, L-1)
    compute = ~shared
    compute[:n_templates] = True  # class 0's rows compute everything, the shared part included
    logp = torch.empty(b, p, dtype=torch.float32, device=images.device)
    prefix = torch.empty(b, n_templates, dtype=torch.float32, device=images.device)
    chunk = max(1, rows_per_pass // max(1, b))  # prompts per pass; each pass scores b x chunk rows
    for start in range(0, p, chunk):
        part = prompts[start:start + chunk]  # (k, L)
        k = part.shape[0]
        rows = part.unsqueeze(0).expand(b, -1, -1).reshape(b * k, -1)
        mem = memory.unsqueeze(1).expand(-1, k, -1, -1).reshape(b * k, *memory.shape[1:])
        mask = compute[start:start + k].unsqueeze(0).expand(b, -1, -1).reshape(b * k, -1)
        tok = model.token_logprobs(mem, rows, positions=mask).view(b, k, -1)
        own = shared[start:start + k, :tok.shape[-1]]
        logp[:, start:start + k] = (tok * ~own).sum(dim=-1)  # the class-specific positions
        first = [i for i in range(k) if start + i < n_templates]  # class 0's rows: the shared sums
        for i in first:
            prefix[:, start + i] = (tok[:, i] * own[i]).sum(dim=-1)
    logp = logp.view(b, n_classes, n_templates) + prefix.unsqueeze(1)
    return torch.logsumexp(logp, dim=-1) - math.log(n_templates)


def generative_zeroshot_scores(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    ds: EvalDataset,
    templates: str | Sequence[str] = "auto",
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    rows_per_pass: int = 256,
) -> tuple[torch.Tensor, np.ndarray, int]:
    """``(scores [M, C] float32 on the CPU, dataset indices [M], undecodable images)`` of a
    captioning or bag-of-words ``model`` on a labelled ``ds``. ``rows_per_pass`` bounds the
    (image, prompt) pairs the decoder scores at once (memory: rows x prompt length x vocab)."""
    kind = objective(model)
    if kind not in GENERATIVE_OBJECTIVES:
        raise ValueError(f"generative zero-shot scoring takes a captioning or bow model, not a {kind} one")
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"dataset {ds.name!r} has no class labels: zero-shot classification needs them")
    device = torch.device(device) if device is not None else model_device(model)
    if ds.transform is None:
        ds.set_image_size(int(model.image_size))
    temps = resolve_templates(templates, ds.name)
    classes = list(ds.classnames)
    was_training = model.training
    model.eval()
    scores, indices, skipped = [], [], 0
    try:
        with torch.no_grad(), autocast_for(device):
            if kind == "bow":
                bags = bow_class_bags(model, tokenizer, classes, temps, device)
            else:
                prompts = _prompt_tokens(model, tokenizer, classes, temps, device)
            for images, idx, bad in image_batches(ds, device, batch_size=batch_size, num_workers=num_workers):
                skipped += bad
                if images is None:
                    continue
                images = images.to(device, non_blocking=True)
                if kind == "bow":
                    s = F.log_softmax(model.word_logits(images).float(), dim=-1) @ bags.T
                else:
                    s = _captioning_scores(model, images, prompts, len(classes), len(temps), rows_per_pass)
                scores.append(s.float().cpu())
                indices.append(idx)
    finally:
        model.train(was_training)
    if skipped:
        log.warning("%s: %d images could not be decoded and were skipped", ds.name, skipped)
    if not scores:
        raise ValueError(f"{ds.name}: no image could be decoded ({skipped} skipped)")
    return torch.cat(scores), torch.cat(indices).numpy(), skipped
