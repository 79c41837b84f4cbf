"""The five eval tasks on an in-process model: each returns (results, markdown, extra files).

    ctx = EvalContext(model, tokenizer, device="cpu", cache=FeatureCache("cache"), checkpoint_fp=fp)
    results, md, files = run_zeroshot(ctx, load_eval_dataset("packaged:digits"), templates="auto")

Image features come from :meth:`EvalContext.features`: cached per (checkpoint fingerprint,
dataset fingerprint, transform) when a cache and a fingerprint are given.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.eval.api import build_zeroshot_classifier, eval_mode, retrieval_eval, zeroshot_scores
from pretrain.eval.datasets import EvalDataset
from pretrain.eval.features import FeatureCache, FeatureSet, extract_image_features, model_fingerprint
from pretrain.eval.generative import generative_zeroshot_scores, objective
from pretrain.eval.fewshot import DEFAULT_SHOTS, few_shot, few_shot_markdown, few_shot_plot
from pretrain.eval.linear_probe import linear_probe
from pretrain.eval.metrics import classification_metrics
from pretrain.eval.report import markdown_table
from pretrain.eval.templates import TEMPLATE_SETS, resolve_templates

_CLS_COLUMNS = ["top1", "top5", "mean_per_class_recall", "n"]


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device | str = "cpu"
    batch_size: int = 256
    num_workers: int = 0
    cache: FeatureCache | None = None
    checkpoint_fp: str | None = None  # None with a cache: hashed from the weights
    progress: bool = True

    def features(self, ds: EvalDataset) -> FeatureSet:
        if ds.transform is None:
            ds.set_image_size(int(self.model.image_size))

        def compute() -> FeatureSet:
            with eval_mode(self.model):
                return extract_image_features(self.model, ds, device=self.device, batch_size=self.batch_size,
                                              num_workers=self.num_workers, progress=self.progress,
                                              desc=f"{ds.name} images")

        if self.cache is None:
            return compute()
        if self.checkpoint_fp is None:
            self.checkpoint_fp = model_fingerprint(self.model)
        return self.cache.get_or_compute(self.checkpoint_fp, ds, compute)

    def classifier(self, ds: EvalDataset, templates: str | Sequence[str]) -> torch.Tensor:
        return build_zeroshot_classifier(self.model, self.tokenizer, ds.classnames, templates,
                                         device=self.device, batch_size=self.batch_size, dataset_name=ds.name,
                                         progress=self.progress)


def _labelled(ds: EvalDataset, what: str) -> None:
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"{what} needs a labelled dataset; {ds.name!r} has none (is it a captions: set?)")


def _zeroshot_metrics(ctx: EvalContext, ds: EvalDataset, fs: FeatureSet, templates: str | Sequence[str]) -> dict:
    return _zs(ctx, ds, fs.features, ds.labels[fs.indices], templates)


def _zs(ctx: EvalContext, ds: EvalDataset, feats: np.ndarray, labels: np.ndarray,
        templates: str | Sequence[str]) -> dict:
    return classification_metrics(zeroshot_scores(feats, ctx.classifier(ds, templates)).cpu(), labels)


def run_zeroshot(ctx: EvalContext, ds: EvalDataset, templates: str | Sequence[str] = "auto") -> tuple[dict, str, list[Path]]:
    _labelled(ds, "zero-shot")
    temps = resolve_templates(templates, ds.name)
    if objective(ctx.model) != "contrastive":  # captioning / bag of words: prompt likelihoods, no embeddings
        scores, indices, skipped = generative_zeroshot_scores(ctx.model, ctx.tokenizer, ds, temps, device=ctx.device,
                                                              batch_size=ctx.batch_size, num_workers=ctx.num_workers)
        fs = FeatureSet(np.zeros((len(indices), 0), np.float32), indices, skipped)
        metrics = classification_metrics(scores, ds.labels[indices])
    else:
        fs = ctx.features(ds)
        metrics = _zeroshot_metrics(ctx, ds, fs, temps)
    res = {"task": "zeroshot", "dataset": ds.name, "n_templates": len(temps), "templates": temps,
           "skipped_images": fs.skipped, "metrics": metrics}
    md = f"## Zero-shot: {ds.name} ({len(temps)} templates)\n\n" + markdown_table([metrics], _CLS_COLUMNS)
    return res, md, []


def run_ablation(ctx: EvalContext, ds: EvalDataset, templates: str | Sequence[str] = "auto") -> tuple[dict, str, list[Path]]:
    """Class name alone vs one template vs ensembles (the paper's prompt-engineering analysis)."""
    _labelled(ds, "the template ablation")
    fs = ctx.features(ds)
    variants: dict[str, list[str]] = {"class name only": TEMPLATE_SETS["name"],
                                      "single template": TEMPLATE_SETS["single"]}
    if ds.name in TEMPLATE_SETS:
        variants[f"{ds.name} ensemble"] = TEMPLATE_SETS[ds.name]
    variants["openai_imagenet ensemble (80)"] = TEMPLATE_SETS["openai_imagenet"]
    user = resolve_templates(templates, ds.name)
    if user not in variants.values():
        variants["given templates"] = user
    rows, results = [], {}
    for label, temps in variants.items():
        m = _zeroshot_metrics(ctx, ds, fs, temps)
        results[label] = {**m, "n_templates": len(temps)}
        rows.append({"variant": label, "templates": len(temps), **m})
    md = (f"## Prompt ablation: {ds.name}\n\n"
          + markdown_table(rows, ["variant", "templates", "top1", "top5", "mean_per_class_recall"]))
    return {"task": "ablation", "dataset": ds.name, "skipped_images": fs.skipped, "variants": results}, md, []


def _probe_arrays(ctx: EvalContext, train_ds: EvalDataset, test_ds: EvalDataset) -> tuple[np.ndarray, ...]:
    _labelled(train_ds, "a linear probe")
    _labelled(test_ds, "a linear probe")
    if list(train_ds.classnames) != list(test_ds.classnames):
        raise ValueError("train and test sets have different class lists")
    tr, te = ctx.features(train_ds), ctx.features(test_ds)
    return tr.features, train_ds.labels[tr.indices], te.features, test_ds.labels[te.indices]


def run_linear_probe(ctx: EvalContext, train_ds: EvalDataset, test_ds: EvalDataset, *, val_fraction: float = 0.2,
                     seed: int = 0, max_iter: int = 1000) -> tuple[dict, str, list[Path]]:
    xtr, ytr, xte, yte = _probe_arrays(ctx, train_ds, test_ds)
    m = linear_probe(xtr, ytr, xte, yte, num_classes=len(test_ds.classnames), val_fraction=val_fraction,
                     seed=seed, max_iter=max_iter)
    md = f"## Linear probe: {test_ds.name}\n\n" + markdown_table([m], _CLS_COLUMNS + ["C", "val_top1", "n_train", "n_val"])
    return {"task": "linear-probe", "dataset": test_ds.name, "metrics": m}, md, []


def run_few_shot(ctx: EvalContext, train_ds: EvalDataset, test_ds: EvalDataset, *, out_dir: str | Path,
                 shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 5, templates: str | Sequence[str] = "auto",
                 val_fraction: float = 0.2, max_iter: int = 1000) -> tuple[dict, str, list[Path]]:
    xtr, ytr, xte, yte = _probe_arrays(ctx, train_ds, test_ds)
    zs = _zs(ctx, test_ds, xte, yte, templates)
    rows = few_shot(xtr, ytr, xte, yte, num_classes=len(test_ds.classnames), shots=shots, seeds=seeds,
                    val_fraction=val_fraction, max_iter=max_iter)
    plot = few_shot_plot(rows, zs["top1"], Path(out_dir) / f"few-shot-{test_ds.name}.png",
                         title=f"{test_ds.name}: few-shot probe vs zero-shot")
    md = f"## Few-shot linear probe vs zero-shot: {test_ds.name}\n\n" + few_shot_markdown(rows, zs["top1"])
    res = {"task": "few-shot", "dataset": test_ds.name, "zeroshot": zs,
           "shots": {str(r["k"]): r for r in rows}}
    return res, md, [plot]


def run_retrieval(ctx: EvalContext, ds: EvalDataset) -> tuple[dict, str, list[Path]]:
    fs = ctx.features(ds)
    m = retrieval_eval(ctx.model, ctx.tokenizer, ds, device=ctx.device, batch_size=ctx.batch_size, features=fs)
    cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n_images", "n_texts"]
    md = f"## Retrieval: {ds.name}\n\n" + markdown_table([m], cols)
    return {"task": "retrieval", "dataset": ds.name, "skipped_images": fs.skipped, "metrics": m}, md, []
