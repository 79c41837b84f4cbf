"""Training/eval data: webdataset shards -> normalised image tensors + caption tokens.

    from pretrain.data import make_train_loader, DataSource, eval_transform, train_transform
    loader = make_train_loader([DataSource("shards/{00000..00009}.tar")], tokenizer=tok,
                               image_size=224, micro_batch=256, num_workers=4, seed=0, epoch=0,
                               rank=0, world_size=1, steps=100)

Modules: ``sources`` (patterns, manifests, opening shards), ``stream`` (raw-sample stream:
shard order, tar reading, weighted mix, shuffle buffer), ``transforms`` (decode, crops,
normalisation), ``loader`` (batching, fixed steps, exact resume).
"""
from .loader import TrainLoader, make_train_loader
from .sources import DataSource, expand_sources, expand_urls, open_shard
from .transforms import (CLIP_MEAN, CLIP_STD, EvalTransform, center_crop_box, crop_resize, decode_rgb,
                         eval_transform, header_size,
                         random_square_crop_box, resize_shorter_side_size, sample_rng,
                         to_normalized_tensor, train_transform)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DataSource", "EvalTransform", "TrainLoader", "center_crop_box", "crop_resize",
    "decode_rgb", "eval_transform", "expand_sources", "header_size", "expand_urls", "make_train_loader",
    "open_shard", "random_square_crop_box", "resize_shorter_side_size", "sample_rng",
    "to_normalized_tensor", "train_transform",
]
