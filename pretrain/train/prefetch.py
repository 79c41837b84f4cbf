"""Host-to-device prefetch of the next micro-batch, overlapped with the current step.

    from pretrain.train.prefetch import DevicePrefetcher
    batches = DevicePrefetcher(iter(loader), device, dtype)   # next(batches) -> batch on device
    ...
    batches.close()

On CUDA the loader's batches come in pinned memory (pretrain/data/loader.py), so a
`non_blocking` copy issued on a side stream runs on the copy engine while the default
stream computes the current step; the consumer's stream waits on the copy's event before
using the batch, and `record_stream` keeps the allocator from reusing the memory early.
Images are cast to the engine's compute dtype on the device (after the copy: a bf16 copy
would halve the transfer, but the cast on the host would cost CPU time per sample).
On CPU it is a pass-through: the batches are the loader's own objects, unchanged.
Switch: `train.prefetch_to_device` (pretrain/train/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DevicePrefetcher:
    """Iterator over `batches` (dicts of tensors) that keeps the next one in flight to `device`."""

    def __init__(self, batches: Iterator[dict], device: torch.device, dtype: torch.dtype) -> None:
        self.batches, self.device, self.dtype = batches, device, dtype
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: tuple[dict, torch.cuda.Event] | None = None
        if self.cuda:
            self._issue()

    def _issue(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.pending = None
            return
        with torch.cuda.stream(self.stream):
            moved = {}
            for key, value in batch.items():
                # only the model's inputs move; counters ("skipped") stay on the host, where
                # reading them costs no device synchronisation
                if key in ("images", "tokens") and isinstance(value, torch.Tensor):
                    value = value.to(self.device, non_blocking=True)
                    if key == "images":
                        value = value.to(self.dtype)
                moved[key] = value
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending = (moved, event)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict:
        if not self.cuda:
            return next(self.batches)
        if self.pending is None:
            raise StopIteration
        batch, event = self.pending
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(current)  # the memory belongs to the consumer's stream now
        self._issue()
        return batch

    def close(self) -> None:
        self.pending = None
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
