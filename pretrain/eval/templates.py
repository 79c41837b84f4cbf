"""Prompt template sets for zero-shot classification (data, plus a resolver).

Each template holds one ``{}`` that the class name fills. Sets:

- ``openai_imagenet``: the 80 ImageNet templates of the CLIP paper's prompt-ensembling study.
- ``openai_imagenet7``: the 7-template subset the CLIP authors found best on ImageNet.
- ``single``: ``"a photo of a {}."``; ``name``: the bare class name (ablation baseline).
- per-dataset sets keyed by packaged dataset name (``fashion-mnist``, ``digits``, ``mnist5k``).
- a user file: one template per line (blank lines and ``#`` comments ignored).

    from pretrain.eval.templates import resolve_templates
    resolve_templates("auto", dataset_name="fashion-mnist")   # the dataset's own set
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

OPENAI_IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

OPENAI_IMAGENET7_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

SINGLE_TEMPLATE: list[str] = ["a photo of a {}."]
NAME_ONLY_TEMPLATE: list[str] = ["{}"]

FASHION_MNIST_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a low resolution photo of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a photo of a {}, a fashion item.",
    "a small photo of the {}.",
]

DIGIT_TEMPLATES: list[str] = [
    "a photo of the number {}.",
    'a photo of the number: "{}".',
    "a handwritten digit {}.",
    "a black and white photo of the digit {}.",
    "a low resolution photo of the number {}.",
    "the digit {}, written by hand.",
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "openai_imagenet7": OPENAI_IMAGENET7_TEMPLATES,
    "single": SINGLE_TEMPLATE,
    "name": NAME_ONLY_TEMPLATE,
    "fashion-mnist": FASHION_MNIST_TEMPLATES,
    "digits": DIGIT_TEMPLATES,
    "mnist5k": DIGIT_TEMPLATES,
}


def validate_templates(templates: Sequence[str], source: str = "templates") -> list[str]:
    """Every template must hold exactly one ``{}``; an empty set is an error."""
    out = [str(t) for t in templates]
    if not out:
        raise ValueError(f"{source}: no templates")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"{source}: template {t!r} must contain exactly one '{{}}'")
    return out


def read_template_file(path: str | Path) -> list[str]:
    """One template per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    kept = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return validate_templates(kept, source=str(path))


def resolve_templates(spec: str | Sequence[str] = "auto", dataset_name: str | None = None) -> list[str]:
    """Turn a template spec into a list of templates.

    ``spec``: a list of templates; a set name from :data:`TEMPLATE_SETS`; ``"auto"`` (the
    dataset's own set when one exists, else ``openai_imagenet``); or a file path.
    """
    if not isinstance(spec, str):
        return validate_templates(spec)
    if spec == "auto":
        spec = dataset_name if dataset_name in TEMPLATE_SETS else "openai_imagenet"
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    if Path(spec).is_file():
        return read_template_file(spec)
    raise ValueError(
        f"unknown template set {spec!r}: use one of {sorted(TEMPLATE_SETS)}, 'auto', or a file path"
    )
