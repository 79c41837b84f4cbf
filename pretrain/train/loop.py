"""The training loop: `fit(cfg, env, device)` from a fresh or resumed run dir to the end.

Per optimizer step: preemption check (all ranks agree) -> `grad_accum` micro-batches from
the loader -> LR for this step -> `train_step` -> logit-scale clamp -> (every `logging.every_steps`:
read the buffered steps' figures back in one transfer, counters, metrics) -> non-finite
stop check -> checkpoint (every `checkpoint.every_steps` and at the end) -> evaluation
(every `eval.every_steps` and at the end), after which rank 0 redraws the training-curve
figure (pretrain/train/figure.py; also at the end) and queues it for MLflow. Every logging
step goes to metrics.jsonl and MLflow; the console line with rate and ETA comes every ~10%
of the steps or ~30 s (`logging.console=paced`, pretrain/progress.py) or at every logging
step (`every`). The plain step's loss, non-finite flag, logit
scale and skipped-sample counts stay on the device between read-backs (also done before a
checkpoint, an evaluation or a preemption save), and the counters are then computed from
each buffered step in order: they equal those of a read-back every step. Returns the
process exit code; raises `NonFiniteError` after saving a checkpoint when
`train.max_consecutive_nonfinite` steps in a row were skipped, detected at the first
read-back after the limit was reached (so up to `logging.every_steps - 1` later).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.config import RunConfig, flatten
from pretrain.data import DataSource, make_train_loader
from pretrain.engine_step import PendingStep, read_back
from pretrain.gradcache import gradcache_train_step
from pretrain.loss import get_loss
from pretrain.progress import Pacer, clock
from pretrain.tokenizer import default_tokenizer
from pretrain.train import checkpoint as ckpt
from pretrain.train.backends import configure_backends
from pretrain.train.build import build_engine
from pretrain.train.distributed import DistEnv, barrier
from pretrain.train.evaluation import PeriodicEval
from pretrain.train.figure import ARTIFACT_DIR, write_training_figure
from pretrain.train.logit_scale import clamp_logit_scale
from pretrain.train.meter import WindowMeter
from pretrain.train.optim import lr_at, set_lr
from pretrain.train.prefetch import DevicePrefetcher
from pretrain.train.preempt import PreemptionFlag
from pretrain.train.run_dir import claim, trim_metrics, write_run_files
from pretrain.train.state import TrainState
from pretrain.train.step import compute_dtype, train_step
from pretrain.train.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _seed_rank(seed: int, rank: int) -> None:
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


def fit(cfg: RunConfig, env: DistEnv, device: torch.device) -> int:
    run_dir = Path(cfg.output_dir)
    preempt = PreemptionFlag()  # installed first: a signal during start-up is not lost
    claim(run_dir, cfg.checkpoint, env.is_main)  # one training per run dir; never two runs mixed
    applied = configure_backends(cfg.train, device)
    if applied:
        log.info("backend settings: %s", applied)
    engine, ds_config = build_engine(cfg, env.world_size)
    if env.is_main:
        write_run_files(run_dir, cfg, ds_config)
    barrier()
    accum = cfg.grad_accum(env.world_size)
    _seed_rank(cfg.train.seed, env.rank)
    state = TrainState(world_size=env.world_size, grad_accum=accum, data_workers=cfg.data.workers)
    resumed = ckpt.resume(engine, run_dir) if cfg.checkpoint.resume else None
    if resumed is not None:
        state = TrainState.from_client_state(resumed, env.world_size, accum, cfg.data.workers)
    if env.is_main:  # the steps after the checkpoint are trained (and logged) again
        trim_metrics(run_dir, state.step)
    tracker = Tracker(env.is_main and cfg.logging.mlflow, run_dir, cfg.logging.tracking_uri,
                      cfg.logging.experiment, cfg.logging.run_name)
    state.mlflow_run_id = tracker.start(flatten(cfg), state.mlflow_run_id) or state.mlflow_run_id
    if env.is_main:
        tracker.log_artifact(run_dir / "run_config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
    trainer = _Trainer(cfg, env, device, engine, state, tracker, run_dir, accum)
    try:
        code, status = trainer.run(preempt)
        if env.is_main and trainer.figure_step != state.step:
            trainer.publish_figure()
    except BaseException:
        tracker.close("FAILED")
        raise
    # The MLflow model embeds images and texts: a two-tower (contrastive) model only.
    if (status == "FINISHED" and env.is_main and cfg.logging.log_model
            and getattr(engine.module, "objective", "contrastive") == "contrastive"):
        # rank 0 only, after the final checkpoint is complete; the other ranks wait at exit
        tracker.log_model(run_dir, default_tokenizer(), state.step, cfg.logging.registered_model_name)
    tracker.close(status)
    return code


class _Trainer:
    """The loop's working set; one method per phase of a step."""

    def __init__(self, cfg: RunConfig, env: DistEnv, device: torch.device, engine, state: TrainState,
                 tracker: Tracker, run_dir: Path, accum: int) -> None:
        self.cfg, self.env, self.device, self.engine, self.state = cfg, env, device, engine, state
        self.tracker, self.run_dir, self.accum = tracker, run_dir, accum
        self.total, self.per_epoch = cfg.total_steps(), cfg.steps_per_epoch()
        self.tokenizer = default_tokenizer()
        self.loss_fn = get_loss(cfg.train.loss, **cfg.train.loss_options)
        self.step_fn = train_step
        if cfg.train.grad_cache:  # same signature and output: the micro-batches become cache chunks
            self.step_fn = gradcache_train_step
            log.info("gradient caching: %d chunks of %d per rank and step", accum, cfg.train.micro_batch)
        self.evaluator = PeriodicEval(cfg, self.tokenizer, run_dir, env.rank)
        self.meter = WindowMeter()
        # Steps whose figures are still on the device: (step, data_s, lr, PendingStep or StepOutput).
        self.pending: list[tuple] = []
        self.last_out = None
        self.limit_step: int | None = None  # the step at which max_consecutive_nonfinite was reached
        # The console line: every ~10% of this attempt's steps or ~30 s (pretrain/progress.py);
        # metrics.jsonl and MLflow still get every `logging.every_steps`.
        self.first_step = state.step
        self.pacer = Pacer(self.total - state.step)
        self.figure_step: int | None = None  # the step the training figure was last drawn at

    def run(self, preempt: PreemptionFlag) -> tuple[int, str]:
        state = self.state
        log.info("training steps %d..%d of %d (%d per epoch, grad accumulation %d, world size %d)",
                 state.step + 1, self.total, self.total, self.per_epoch, self.accum, self.env.world_size)
        while state.step < self.total:
            batches = iter(self._loader())
            if self.cfg.train.prefetch_to_device:  # a pass-through on CPU
                batches = DevicePrefetcher(batches, self.device, compute_dtype(self.engine))
            try:
                while state.step_in_epoch < self.per_epoch and state.step < self.total:
                    if preempt.requested(self.device):
                        self._drain()
                        self.save()
                        # slurm/common.sh greps this line (before the parenthesis) to requeue
                        log.warning("preempted: checkpoint saved at step %d (%s, exit %d)", state.step,
                                    preempt.agreed.name, preempt.exit_code)
                        return preempt.exit_code, "KILLED"
                    self._step(batches)
                    self._after_step()
            finally:
                batches.close()  # stops this epoch's DataLoader workers, also on an early return
            if state.step_in_epoch >= self.per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
        log.info("training finished at step %d", state.step)
        return 0, "FINISHED"

    def save(self) -> None:
        ckpt.save(self.engine, self.run_dir, self.state.step, self.state.client_state(),
                  self.cfg.checkpoint.keep_last)

    def _loader(self):
        """This rank's loader for the current epoch, starting at the saved stream position."""
        cfg, t, module = self.cfg, self.cfg.train, self.engine.module
        return make_train_loader(
            [DataSource(s.url, s.weight) for s in cfg.data.sources], tokenizer=self.tokenizer,
            image_size=module.image_size, micro_batch=t.micro_batch, num_workers=cfg.data.workers, seed=t.seed,
            epoch=self.state.epoch, rank=self.env.rank, world_size=self.env.world_size,
            steps=self.per_epoch * self.accum, start_step=self.state.step_in_epoch * self.accum,
            resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
            crop_scale=tuple(cfg.data.crop_scale), context_length=module.context_length)

    def _step(self, batches) -> None:
        t, state = self.cfg.train, self.state
        start = time.perf_counter()
        micro = [next(batches) for _ in range(self.accum)]
        data_s = time.perf_counter() - start
        lr = lr_at(state.step, self.cfg, self.total)
        set_lr(self.engine.optimizer, lr)
        inject = self.env.rank == 0 and (state.step + 1) in t.debug_nan_at_steps
        # The plain step's figures stay on the device (defer): read back every logging step.
        defer = {"defer": True} if self.step_fn is train_step else {}
        out = self.step_fn(self.engine, micro, self.loss_fn, inject_nan=inject, **defer)
        scale = getattr(self.engine.module, "logit_scale", None)  # captioning / bag-of-words models have none
        if out.applied and scale is not None:  # a host bool: the optimizer's own overflow check read it back
            clamp_logit_scale(scale, t.max_logit_log_scale)
        state.step += 1
        state.step_in_epoch += 1
        self.pending.append((state.step, data_s, lr, out))
        if state.step % self.cfg.logging.every_steps == 0 or state.step == self.total:
            self._drain()
            self._log(self.last_out, lr)

    def _drain(self) -> None:
        """Read the buffered steps' figures back (one transfer) and account for them in order,
        exactly as if each step had been read back when it ended: counters, warnings, the
        meter, and the step at which `train.max_consecutive_nonfinite` was reached."""
        t, state = self.cfg.train, self.state
        pending, self.pending = self.pending, []
        resolved = iter(read_back([out for *_, out in pending if isinstance(out, PendingStep)]))
        for step, data_s, _lr, out in pending:
            out = next(resolved) if isinstance(out, PendingStep) else out
            state.skipped_samples += out.skipped_samples
            # fp16's loss scaler skips overflowing steps by design; only a non-finite loss counts
            # there. In bf16/fp32 any skipped update is a non-finite step.
            if out.loss_nonfinite or (not out.applied and t.precision != "fp16"):
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
                log.warning("step %d: non-finite %s; update skipped (%d in a row)", step,
                            "loss" if out.loss_nonfinite else "gradient", state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= t.max_consecutive_nonfinite and self.limit_step is None:
                    self.limit_step = step
            else:
                state.consecutive_nonfinite = 0
                state.overflow_steps += int(not out.applied)
            self.meter.add(t.global_batch, data_s, out.loss)
            self.last_out = out

    def _log(self, out, lr: float) -> None:
        state = self.state
        metrics = self.meter.flush()
        if out.logit_scale == out.logit_scale:  # a model without a temperature reports NaN: not logged
            metrics["logit_scale"] = out.logit_scale
        metrics.update(lr=lr, grad_norm=out.grad_norm,
                       skipped_samples=state.skipped_samples, nonfinite_steps=state.nonfinite_steps,
                       overflow_steps=state.overflow_steps, epoch=state.epoch)
        self.tracker.log_metrics(metrics, state.step)
        if not self.env.is_main:
            return
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.step, **metrics}) + "\n")
        norm = f"{out.grad_norm:.3g}" if out.grad_norm is not None else "-"
        done = state.step - self.first_step
        shown = self.pacer.due(done) or state.step == self.total or self.cfg.logging.console == "every"
        eta = self.pacer.eta(done)
        log.log(logging.INFO if shown else logging.DEBUG,
                "step %d/%d loss %.4f lr %.3g scale %.2f grad_norm %s %.1f samples/s data %.0f%% skipped %d, "
                "elapsed %s, ETA %s", state.step, self.total, metrics["loss"], lr, out.logit_scale, norm,
                metrics["samples_per_s"], 100 * metrics["data_wait_frac"], state.skipped_samples,
                clock(self.pacer.elapsed()), clock(eta) if eta is not None else "-")

    def _after_step(self) -> None:
        state, t = self.state, self.cfg.train
        every = self.cfg.checkpoint.every_steps
        checkpoint = (every > 0 and state.step % every == 0) or state.step == self.total
        evaluate = self.evaluator.due(state.step, self.total)
        if checkpoint or evaluate:
            self._drain()  # the saved counters are exact; nothing is pending across a boundary
        if self.limit_step is not None:
            # Detected at the read-back after the limit was reached (`logging.every_steps`
            # bounds the delay): the checkpoint holds the weights as of this step.
            self.save()
            raise NonFiniteError(
                f"{t.max_consecutive_nonfinite} consecutive steps with a non-finite loss or gradient up to step "
                f"{self.limit_step} (train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); stopped at "
                f"step {state.step}, checkpoint {ckpt.tag_for(state.step)}")
        if checkpoint:
            self.save()
        if evaluate:
            results = self.evaluator.run(self.engine, state.step)
            self.tracker.log_metrics(results, state.step)
            if self.env.is_main:
                self.tracker.log_artifact(self.evaluator.result_path(state.step), "eval")
                self.publish_figure()

    def publish_figure(self) -> None:
        """Rank 0: redraw <run dir>/training_curves.png and queue it for MLflow
        (nothing with `logging.figure=false`)."""
        if not self.cfg.logging.figure:
            return
        path = write_training_figure(self.run_dir)
        self.figure_step = self.state.step
        if path is not None:
            self.tracker.log_artifact(path, ARTIFACT_DIR)
