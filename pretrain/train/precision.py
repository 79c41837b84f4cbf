"""Which training precisions this process's device supports, asked of the device itself.

    from pretrain.train.precision import supported_precisions, require_precision
    supported_precisions()          # e.g. ("fp32", "bf16") on a CPU without fp16 kernels
    require_precision("fp16")       # raises UnsupportedPrecisionError naming device + choices

DeepSpeed refuses an fp16 (or bf16) config on a device that lacks it, but only from inside
`deepspeed.initialize` on every rank ("Type fp16 is not supported on your device"). The
answer differs between machines of the same kind: on CPU, DeepSpeed's accelerator reports
fp16 only where oneDNN has fp16 kernels (`torch.ops.mkldnn._is_mkldnn_fp16_supported()`,
true on CPUs with AVX512-FP16 or AMX-FP16; an AMD EPYC with avx512_bf16 but no
avx512_fp16 answers no). The trainer asks the same accelerator before building anything,
so a run config that cannot work on this machine stops at start with one clear message.
"""

from __future__ import annotations

from functools import lru_cache

PRECISIONS = ("fp32", "bf16", "fp16")


class UnsupportedPrecisionError(ValueError):
    """`train.precision` names a precision this device cannot train in."""


@lru_cache(maxsize=1)
def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device_description() -> str:
    """The accelerator DeepSpeed will use, in words (e.g. "cpu", "cuda (NVIDIA H100 80GB HBM3)")."""
    acc = _accelerator()
    name = acc.device_name()
    if name == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(torch.cuda.current_device())})"
    if name == "cpu":
        import platform

        cpu = platform.processor() or platform.machine()
        return f"cpu ({cpu}; oneDNN fp16 kernels: {'yes' if acc.is_fp16_supported() else 'no'})"
    return str(name)


def supported_precisions() -> tuple[str, ...]:
    """The precisions DeepSpeed's accelerator accepts on this machine, fp32 first."""
    acc = _accelerator()
    # DeepSpeed's CPU accelerator answers None (not False) for "no fp16": compare by truth
    flags = {"fp32": True, "bf16": bool(acc.is_bf16_supported()), "fp16": bool(acc.is_fp16_supported())}
    return tuple(p for p in PRECISIONS if flags[p])


def require_precision(precision: str) -> None:
    """Raise UnsupportedPrecisionError unless `precision` works on this device."""
    supported = supported_precisions()
    if precision not in supported:
        raise UnsupportedPrecisionError(
            f"train.precision={precision} is not supported on this device: {device_description()}. "
            f"Precisions this device supports: {', '.join(supported)} "
            f"(e.g. --train.precision={supported[-1]})")
