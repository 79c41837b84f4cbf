"""Per-process GPU library settings of a run, chosen from the run config by device.

    from pretrain.train.backends import configure_backends
    applied = configure_backends(cfg.train, device)   # {} on CPU

On CUDA:
- `train.cudnn_benchmark` (default on): cuDNN times its convolution algorithms once per
  input shape and keeps the fastest. Training shapes are fixed (one micro-batch size, one
  image size), so the timing is paid once; ResNets and the ViT patch convolution gain.
- `train.tf32` (default off): fp32 matrix multiplications in TF32
  (`torch.set_float32_matmul_precision("high")`). Off by default because the contrastive
  loss is computed in fp32 on purpose: TF32 keeps ~10 mantissa bits, an error of ~0.1 in a
  logit at scale 100. bf16/fp16 models are unaffected either way. cuDNN convolutions keep
  PyTorch's own default; the per-backend `fp32_precision` flags are not used because
  setting them makes any later read of the legacy `allow_tf32` flags (torch.compile reads
  them) raise an error.
On CPU nothing is changed.
"""

from __future__ import annotations

import torch

from pretrain.config.schema import TrainConfig


def configure_backends(train: TrainConfig, device: torch.device) -> dict[str, object]:
    """Apply the CUDA library settings of `train` in this process; return what was set."""
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    matmul = "high" if train.tf32 else "highest"
    torch.set_float32_matmul_precision(matmul)
    return {"cudnn_benchmark": train.cudnn_benchmark, "float32_matmul_precision": matmul}
