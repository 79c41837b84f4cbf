"""CLIP's ModifiedResNet image tower (arXiv 2103.00020; docs/models.md) with QKV attention pooling.

Differences from a torchvision ResNet: a 3-conv stem with a 2x2 average pool, anti-aliased
downsampling (stride-1 convolutions followed by an average pool; shortcut = avgpool ->
1x1 conv -> BN) and attention pooling over [mean token; spatial grid] instead of global
average pooling. Keys match OpenAI's layout (``conv1..3``, ``bn1..3``,
``layer{1..4}.{j}.downsample.{0,1}``, ``attnpool.{q,k,v,c}_proj``).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import run_checkpointed


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # every conv has stride 1; the 3x3 conv is followed by an avgpool when downsampling
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            # "-1" keeps the conv/bn at indices 0/1, as in OpenAI's checkpoints
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the query is the mean of the grid, keys/values are
    [mean; grid] plus a learned positional embedding; output = c_proj(attention)."""

    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if embed_dim % heads != 0:
            raise ValueError(f"attention-pool width {embed_dim} not divisible by heads {heads}")
        self.spacial_dim, self.heads = spacial_dim, heads
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h != self.spacial_dim or w != self.spacial_dim:
            raise ValueError(f"attention pool expects a {self.spacial_dim}x{self.spacial_dim} "
                             f"grid, got {h}x{w}: input image size does not match the model")
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, HW+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        d = c // self.heads
        # only the mean token's output is used, so it is the only query (same result as
        # attending with every token as a query and keeping row 0)
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, d).transpose(1, 2)  # (B, H, 1, D)
        k = self.k_proj(x).view(b, -1, self.heads, d).transpose(1, 2)  # (B, H, HW+1, D)
        v = self.v_proj(x).view(b, -1, self.heads, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D)
        return self.c_proj(y.transpose(1, 2).reshape(b, c))


@contextmanager
def _frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics on exit: checkpoint recomputation runs the
    forward a second time, which would otherwise apply the momentum update twice."""
    saved = [(buf, buf.detach().clone()) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) for buf in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class _CheckpointedStage:
    """Callable for one checkpointed stage: the first call is the real forward, later
    calls are recomputations and must leave BatchNorm statistics untouched."""

    def __init__(self, stage: nn.Module) -> None:
        self.stage, self.calls = stage, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.stage(x)
        with _frozen_bn_statistics(self.stage):
            return self.stage(x)


class ModifiedResNet(nn.Module):
    def __init__(self, layers: Sequence[int], output_dim: int, heads: int,
                 input_resolution: int = 224, width: int = 64) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths, got {list(layers)}")
        if input_resolution % 32 != 0:
            raise ValueError(f"ResNet image size must be a multiple of 32, got {input_resolution}")
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.grad_checkpointing = False
        self.channels_last = False  # model.channels_last: NHWC activations (cuDNN's fast layout)
        # stem: three 3x3 convs, only the first strided, then a 2x2 average pool
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)
        self.init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        """OpenAI's init: attention-pool projections std in_features^-0.5 and a zero gamma
        on each bottleneck's last BN (each residual branch starts as the identity)."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj,
                     self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages():
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(f"expected {self.input_resolution}px images, got "
                             f"{tuple(x.shape[-2:])}")
        x = x.to(self.conv1.weight.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)  # (B, W, H/4, W/4)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self.stages():
            x = run_checkpointed(_CheckpointedStage(stage), x) if checkpointing else stage(x)
        return self.attnpool(x)  # (B, output_dim)
