"""Library API for zero-shot classification and retrieval (used by the trainer's periodic eval).

    from pretrain.eval import load_eval_dataset, zeroshot_eval, retrieval_eval
    ds = load_eval_dataset("packaged:fashion-mnist", split="test", limit=2000)
    zeroshot_eval(model, tokenizer, ds, templates="auto", device="cuda")
    #   -> {"top1", "top5" (>= 5 classes only), "mean_per_class_recall", "n"}
    retrieval_eval(model, tokenizer, load_eval_dataset("captions:/val/{0..1}.tar"), device="cuda")
    #   -> {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n_images", "n_texts"}

``model`` is a plain CLIP nn.Module (zero-shot also takes the captioning and bag-of-words
models, dispatched on ``model.objective`` to generative.py) (``encode_image``, ``encode_text``, ``image_size``,
``context_length``), e.g. a DeepSpeed engine's ``module`` with ZeRO-3 parameters gathered.
Everything runs under ``torch.no_grad``; the model's train/eval mode is restored afterwards;
CUDA runs under bf16 autocast (features and scores are float32).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.eval.datasets import EvalDataset
from pretrain.eval.features import FeatureSet, encode_texts, extract_image_features, model_device
from pretrain.eval.generative import generative_zeroshot_scores, objective
from pretrain.eval.metrics import classification_metrics, retrieval_metrics
from pretrain.eval.templates import resolve_templates

Tokenizer = Callable[..., torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """model.eval() + no_grad inside; the previous train/eval mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def build_zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "auto",
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    dataset_name: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Class embeddings W [C, D]: per class, every template filled with the name, each text
    embedding L2-normalised, averaged over templates, renormalised (embedding-space ensembling)."""
    temps = resolve_templates(templates, dataset_name)
    if not classnames:
        raise ValueError("no class names")
    texts = [t.replace("{}", c) for c in classnames for t in temps]  # class-major order
    with eval_mode(model):
        emb = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size, progress=progress)
    emb = emb.view(len(classnames), len(temps), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def zeroshot_scores(image_features: torch.Tensor | np.ndarray, classifier: torch.Tensor) -> torch.Tensor:
    """logits = 100 * normalize(image_features) @ W^T, float32 on the classifier's device."""
    img = torch.as_tensor(image_features, dtype=torch.float32, device=classifier.device)
    return 100.0 * F.normalize(img, dim=-1) @ classifier.float().T


def image_features(
    model: torch.nn.Module,
    ds: EvalDataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> FeatureSet:
    """Normalised image features of ``ds`` (its transform set from ``model.image_size`` if unset)."""
    if ds.transform is None:
        ds.set_image_size(int(model.image_size))
    with eval_mode(model):
        return extract_image_features(model, ds, device=device, batch_size=batch_size,
                                      num_workers=num_workers, progress=progress, desc=f"{ds.name} images")


def zeroshot_eval(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    ds: EvalDataset,
    templates: str | Sequence[str] = "auto",
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    features: FeatureSet | None = None,
) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class recall of ``model`` on a labelled ``ds``.

    ``templates``: ``"auto"`` (the dataset's own set if there is one, else OpenAI's 80),
    ``"openai_imagenet"``, ``"single"``, a set name, a file path or a list.
    ``features``: precomputed image features of ``ds`` (skips the image pass).
    A captioning or bag-of-words model (``model.objective``) is scored by its likelihood of
    each class prompt instead (generative.py; ``features`` unused).
    """
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"dataset {ds.name!r} has no class labels: zero-shot classification needs them")
    device = torch.device(device) if device is not None else model_device(model)
    if objective(model) != "contrastive":  # captioning / bag of words: the prompts' likelihoods
        scores, indices, _ = generative_zeroshot_scores(model, tokenizer, ds, templates, device=device,
                                                        batch_size=batch_size, num_workers=num_workers)
        return classification_metrics(scores, ds.labels[indices])
    fs = features or image_features(model, ds, device=device, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
    W = build_zeroshot_classifier(model, tokenizer, ds.classnames, templates, device=device,
                                  batch_size=batch_size, dataset_name=ds.name)
    scores = zeroshot_scores(fs.features, W).cpu()
    return classification_metrics(scores, ds.labels[fs.indices])


def retrieval_eval(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    ds: EvalDataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    features: FeatureSet | None = None,
) -> dict:
    """Recall@1/5/10 image->text and text->image on a captioned ``ds`` (an image with several
    captions is a hit when any of them is in the top k). Undecodable images and their captions
    are left out."""
    if not ds.is_retrieval:
        raise ValueError(f"dataset {ds.name!r} has no captions: use a captions: dataset for retrieval")
    device = torch.device(device) if device is not None else model_device(model)
    fs = features or image_features(model, ds, device=device, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
    row_of = {int(i): r for r, i in enumerate(fs.indices)}
    keep = [t for t, o in enumerate(ds.text_to_image) if int(o) in row_of]
    with eval_mode(model):
        txt = encode_texts(model, tokenizer, [ds.captions[t] for t in keep], device=device,
                           batch_size=batch_size)
    img = torch.as_tensor(fs.features, device=txt.device)
    sim = (img @ txt.T).cpu()
    owner = np.asarray([row_of[int(ds.text_to_image[t])] for t in keep], dtype=np.int64)
    has_caption = np.zeros(len(fs.indices), dtype=bool)
    has_caption[owner] = True
    if not has_caption.all():  # cannot happen for a loaded captions set; guard direct callers
        raise ValueError("some images have no caption")
    out = retrieval_metrics(sim, owner)
    out.update(n_images=int(sim.shape[0]), n_texts=int(sim.shape[1]))
    return out
