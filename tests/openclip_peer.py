"""The open_clip side of tests/test_openclip_interop.py: runs in the peer virtualenv
(.venv-peer, scripts/setup_peer.sh), which has the real `open_clip` and none of this project.

    .venv-peer/bin/python tests/openclip_peer.py REQUESTS.json

REQUESTS: a list of jobs (one interpreter start for all), each {"model": open_clip model name, "config_dir": dir for open_clip.add_model_config or
null, "weights": our exported file, "loader": "create" (create_model_and_transforms(model,
pretrained=weights)) or "openai" (open_clip.load_openai_model(weights), no config),
"pixels": .npy [N, 3, S, S] float32, "tokens": .npy [M, L] int64, "captions": [str],
"images": [image files for open_clip's own preprocess], "out": .npz path}.
Writes OUT with image / text (the raw, unnormalised embeddings), caption_ids (open_clip's
tokenizer), preprocessed (its transform of each image) and a JSON "meta" (versions,
logit_scale). Nothing is downloaded: every input is a local file.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def run(req: dict) -> None:
    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    if req.get("config_dir"):
        open_clip.add_model_config(req["config_dir"])
    if req["loader"] == "openai":
        model = open_clip.load_openai_model(req["weights"], precision="fp32", device="cpu")
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # OpenAI's BPE; every OpenAI model uses it
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(req["model"], pretrained=req["weights"],
                                                                     device="cpu")
        tokenizer = open_clip.get_tokenizer(req["model"])
    model.eval()
    pixels = torch.from_numpy(np.load(req["pixels"]))
    tokens = torch.from_numpy(np.load(req["tokens"]))
    with torch.no_grad():
        image = model.encode_image(pixels).float().numpy()
        text = model.encode_text(tokens).float().numpy()
    caption_ids = tokenizer(req["captions"]).numpy()
    pre = [preprocess(Image.open(p)).numpy() for p in req.get("images", [])]
    meta = {"open_clip": open_clip.__version__, "torch": torch.__version__, "class": type(model).__name__,
            "logit_scale": float(model.logit_scale.detach()), "image_size": [int(x) for x in np.atleast_1d(
                model.visual.image_size)], "transform": repr(preprocess)}
    np.savez(req["out"], image=image, text=text, caption_ids=caption_ids,
             preprocessed=np.stack(pre) if pre else np.zeros((0,), np.float32),
             meta=np.asarray(json.dumps(meta)))


def main(path: str) -> None:
    with open(path) as f:
        for req in json.load(f):
            run(req)


if __name__ == "__main__":
    main(sys.argv[1])
