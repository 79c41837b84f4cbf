"""Periodic evaluation inside training: zero-shot classification and in-batch retrieval.

Collective (every rank calls `run`); the work happens on rank 0, the others wait at a
barrier. Under ZeRO-3 the parameters are gathered on all ranks
(`GatheredParameters(list(model.parameters()))`) just long enough for rank 0 to copy them
into a plain model, so the evaluation never runs through ZeRO-3's partitioning hooks. A
copy is also taken on CPU when DeepSpeed holds the module in bf16/fp16 (the eval library
autocasts on CUDA only). Results go to `<run dir>/eval/step_<N>.json` and to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters

from pretrain import fs
from pretrain.config import RunConfig
from pretrain.eval import load_eval_dataset, retrieval_eval, zeroshot_eval
from pretrain.train.build import build_model
from pretrain.train.distributed import barrier

log = logging.getLogger(__name__)


class PeriodicEval:
    def __init__(self, cfg: RunConfig, tokenizer: Any, run_dir: str | Path, rank: int) -> None:
        self.cfg = cfg
        self.ecfg = cfg.eval
        self.tokenizer = tokenizer
        self.out_dir = Path(run_dir) / "eval"
        self.rank = rank
        self._datasets: dict[str, Any] = {}

    def due(self, step: int, total_steps: int) -> bool:
        if not self.ecfg.enabled:
            return False
        periodic = self.ecfg.every_steps > 0 and step % self.ecfg.every_steps == 0
        return periodic or (self.ecfg.at_end and step == total_steps)

    def _dataset(self, spec: str, split: str) -> Any:
        key = f"{spec}|{split}"
        if key not in self._datasets:
            limit = self.ecfg.limit or None
            self._datasets[key] = load_eval_dataset(spec, split=split, limit=limit)
        return self._datasets[key]

    def _eval_model(self, engine) -> torch.nn.Module | None:
        """The model rank 0 evaluates: the engine's module, or a plain fp32 copy of it."""
        module = engine.module
        stage3 = engine.zero_optimization_stage() == 3
        low_precision_cpu = engine.device.type == "cpu" and next(module.parameters()).dtype != torch.float32
        if not (stage3 or low_precision_cpu):
            return module
        copy = None
        ctx = GatheredParameters(list(module.parameters())) if stage3 else contextlib.nullcontext()
        with ctx:  # entered on ALL ranks: the gather is collective
            if self.rank == 0:
                copy = build_model(self.cfg).to(engine.device)
                state = {k: v.detach().float() for k, v in module.state_dict().items()}
                copy.load_state_dict(state)
        return copy

    def run(self, engine, step: int) -> dict[str, float]:
        """Evaluate (rank 0) and return flat metrics `{"eval/zeroshot_top1": ..., ...}`."""
        model = self._eval_model(engine)
        flat: dict[str, float] = {}
        if self.rank == 0:
            start = time.perf_counter()
            results: dict[str, Any] = {"step": step}
            e = self.ecfg
            if e.zeroshot_dataset:
                ds = self._dataset(e.zeroshot_dataset, e.zeroshot_split)
                results["zeroshot"] = zeroshot_eval(model, self.tokenizer, ds, e.templates, device=engine.device,
                                                    batch_size=e.batch_size)
            if e.retrieval_dataset:
                ds = self._dataset(e.retrieval_dataset, e.retrieval_split)
                results["retrieval"] = retrieval_eval(model, self.tokenizer, ds, device=engine.device,
                                                      batch_size=e.batch_size)
            results["seconds"] = round(time.perf_counter() - start, 3)
            fs.write_text(self.result_path(step), json.dumps(results, indent=1))
            for task in ("zeroshot", "retrieval"):
                for k, v in results.get(task, {}).items():
                    if isinstance(v, (int, float)):
                        flat[f"eval/{task}_{k}"] = float(v)
            log.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in flat.items()})
        del model
        barrier()
        return flat

    def result_path(self, step: int) -> Path:
        return self.out_dir / f"step_{step:08d}.json"
