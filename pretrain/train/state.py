"""The trainer's own progress counters, saved as DeepSpeed `client_state` in every checkpoint.

`step` counts optimizer steps done (applied or skipped); `epoch` / `step_in_epoch` give the
data-stream position (the loader restarts epoch `epoch` at micro-batch
`step_in_epoch * grad_accum`, pretrain/data/loader.py), so resume continues the exact stream.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_samples: int = 0  # bad samples skipped by the loaders, all ranks
    nonfinite_steps: int = 0  # steps skipped for a NaN/Inf loss or gradient (bf16/fp32 and fp16)
    consecutive_nonfinite: int = 0
    overflow_steps: int = 0  # fp16 loss-scaler skips (a normal part of dynamic loss scaling)
    mlflow_run_id: str | None = None
    # The layout the data position refers to (a resume with another layout is not exact).
    world_size: int = 0
    grad_accum: int = 0
    data_workers: int = 0

    def client_state(self) -> dict[str, Any]:
        return {"trainer_state": dataclasses.asdict(self)}

    @classmethod
    def from_client_state(cls, cs: dict[str, Any], world_size: int, grad_accum: int, data_workers: int) -> "TrainState":
        saved = cs.get("trainer_state")
        if not isinstance(saved, dict):
            raise RuntimeError(f"checkpoint {cs.get('tag')} has no trainer_state in its client state")
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        now = (world_size, grad_accum, data_workers)
        before = (state.world_size, state.grad_accum, state.data_workers)
        if before != now:
            log.warning("resuming with (world size, grad accumulation, data workers) = %s, saved with %s: the "
                        "data stream continues at the same position but is not the uninterrupted one", now, before)
        state.world_size, state.grad_accum, state.data_workers = now
        return state
