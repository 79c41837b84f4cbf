"""The typed run config of `pretrain/run.py`: one dataclass tree, checked as it is built.

Every section is a dataclass whose `__post_init__` rejects values that can never work;
`RunConfig.validate(world_size)` adds the checks that need the launch size (batch
divisibility). Files and overrides are parsed in `pretrain/config/loader.py`.

    from pretrain.config import load_config
    cfg = load_config("configs/tiny.yaml", ["--train.global_batch=64"])
    cfg.validate(world_size=8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
ADAMW_KERNELS = ("default", "foreach", "fused")
OPTIMIZER_IMPLS = ("auto", "torch", "cpu_adam")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """A model-zoo name plus flat `create_model` overrides (e.g. `{image_size: 32}`).

    `init_from`: weights to start a fresh run from (a training run dir, whose newest complete
    checkpoint is consolidated, or an OpenAI-layout `.pt` file); the image positional
    embedding is interpolated to this model's image size. Ignored when the run resumes from
    its own checkpoint (pretrain/train/init_from.py). `init_from_allow_torchscript_code`:
    accept a TorchScript archive there (OpenAI's released `.pt`); loading one runs its code.

    Speed switches (pretrain/models/speed.py, docs/speed.md): `compile` ("none" | "blocks":
    torch.compile each residual block / ResNet bottleneck), `channels_last` (ResNets),
    `ln_fp32` (false: LayerNorm in the activations' own dtype), `patch_dropout` (ViTs,
    FLIP rate in [0, 1), training only)."""

    name: str = "RN-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    init_from: str = ""
    init_from_allow_torchscript_code: bool = False
    compile: str = "none"
    channels_last: bool = False
    ln_fp32: bool = True
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        from pretrain.models import OVERRIDE_KEYS, list_models  # lazy: config must import fast
        from pretrain.models.speed import COMPILE_MODES

        _check(self.name in list_models(), f"model.name {self.name!r} is not in the model zoo; choose one of {list_models()}")
        unknown = sorted(set(self.overrides) - set(OVERRIDE_KEYS))
        _check(not unknown, f"model.overrides has unknown key(s) {unknown}; valid: {list(OVERRIDE_KEYS)}")
        _check("grad_checkpointing" not in self.overrides,
               "set model.grad_checkpointing, not model.overrides.grad_checkpointing")
        _check(self.compile in COMPILE_MODES, f"model.compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        _check(not self.channels_last or not self.is_vit, "model.channels_last applies to ResNet models only")
        _check(0.0 <= self.patch_dropout < 1.0, f"model.patch_dropout must be in [0, 1) (got {self.patch_dropout})")
        _check(self.patch_dropout == 0.0 or self.is_vit, "model.patch_dropout applies to ViT models only")

    @property
    def is_vit(self) -> bool:
        return self.name.startswith("ViT")


@dataclass
class SourceConfig:
    """A braceexpand shard pattern, a data-build manifest.json, or an fsspec URL of either.
    A bare string stands for `{url: ...}` (weight 1), one source for a list of one."""

    __config_shorthand__ = "url"

    url: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check(bool(self.url), "data.sources[].url must be a non-empty shard pattern or manifest path")
        _check(self.weight > 0, f"data.sources[].weight must be > 0 (got {self.weight} for {self.url})")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    samples_per_epoch: int = 0
    workers: int = 2
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.9, 1.0)
    resampled: bool = True

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "data.sources is empty: give at least one shard pattern or manifest")
        _check(self.samples_per_epoch > 0, "data.samples_per_epoch must be > 0")
        _check(self.workers >= 0, "data.workers must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < lo <= hi <= 1 (got {self.crop_scale})")


@dataclass
class OptimizerConfig:
    """AdamW. `betas`/`eps` left as None take the paper's recipe: beta2 0.98, and eps 1e-6
    for ViTs (1e-8 for ResNets), see `resolved()`."""

    lr: float = 5e-4
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float = 0.2
    impl: str = "auto"  # auto: DeepSpeedCPUAdam with optimizer offload, torch AdamW otherwise
    # torch AdamW's kernel: "default" (torch's own choice: a per-tensor loop on CPU, foreach
    # on CUDA), "foreach" (multi-tensor kernels) or "fused" (one fused kernel per group)
    kernel: str = "default"

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr must be > 0")
        if self.betas is not None:
            _check(all(0 <= b < 1 for b in self.betas), f"optimizer.betas must be in [0, 1) (got {self.betas})")
        _check(self.eps is None or self.eps > 0, "optimizer.eps must be > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(self.impl in OPTIMIZER_IMPLS, f"optimizer.impl must be one of {OPTIMIZER_IMPLS} (got {self.impl!r})")
        _check(self.kernel in ADAMW_KERNELS,
               f"optimizer.kernel must be one of {ADAMW_KERNELS} (got {self.kernel!r})")


@dataclass
class ScheduleConfig:
    """Linear warmup from 0 to `optimizer.lr` over `warmup_steps`, then cosine decay to
    `lr * min_lr_ratio` at the last step."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]")


@dataclass
class TrainConfig:
    epochs: int = 1
    global_batch: int = 32
    micro_batch: int = 16
    max_steps: int = 0  # > 0 caps the total optimizer steps (smoke runs); 0 = epochs x steps/epoch
    precision: str = "fp32"
    zero_stage: int = 1
    offload_optimizer: bool = False
    ds_templates: list[str] = field(default_factory=list)  # [] = chosen from stage/offload/precision
    ds_overrides: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed keys, deep-merged last
    grad_clip: float = 1.0  # 0 disables clipping
    loss: str = "clip"  # clip | clip_tiled | clip_ring | siglip | captioning | bow (the last two: other model classes)
    grad_cache: bool = False  # exact gradient caching (pretrain.gradcache): all global negatives per sample
    loss_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest conv algorithm per (fixed) shape
    tf32: bool = False  # CUDA: fp32 matmuls in TF32 (faster; the fp32 loss loses exactness)
    prefetch_to_device: bool = False  # CUDA: copy the next micro-batch on a side stream during the step
    dist_timeout_s: int = 1800  # collective timeout; a dead peer fails the job after at most this
    max_consecutive_nonfinite: int = 5  # this many skipped steps in a row stop the run
    logit_scale_max: float = 100.0  # exp(t) is clamped to this after every step
    debug_nan_at_steps: list[int] = field(default_factory=list)  # test hook: NaN loss on rank 0 at these steps

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.global_batch >= 1 and self.micro_batch >= 1, "train.global_batch and train.micro_batch must be >= 1")
        _check(self.global_batch % self.micro_batch == 0,
               f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch ({self.micro_batch})")
        _check(self.max_steps >= 0, "train.max_steps must be >= 0")
        _check(self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS} (got {self.precision!r})")
        _check(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        _check(not (self.offload_optimizer and self.zero_stage == 0),
               "train.offload_optimizer needs ZeRO stage >= 1 (ZeRO-0 has no partitioned optimizer to offload)")
        # DeepSpeed's plain (ZeRO-0) bf16 path keeps bf16 gradients and applies them to bf16
        # weights; the fp32 master copy needs a ZeRO optimizer (docs/cpu_development.md).
        # DeepSpeed's ZeRO-0 bf16 path trains on bf16 gradients, and its ZeRO-0 fp16 optimizer
        # keeps fp32 master weights out of reach of the public safe_*_fp32_param API that the
        # logit-scale clamp needs: low precision takes a ZeRO optimizer (stage >= 1).
        _check(not (self.precision in ("bf16", "fp16") and self.zero_stage == 0),
               f"train.precision={self.precision} needs train.zero_stage >= 1 (ZeRO-0 + {self.precision} "
               "has no reachable fp32 master weights); use zero_stage 1 or precision fp32")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        _check(self.dist_timeout_s >= 1, "train.dist_timeout_s must be >= 1")
        from pretrain.loss import list_losses, objective_of

        _check(self.loss in list_losses(), f"train.loss {self.loss!r} is unknown; choose one of {list_losses()}")
        # captioning / bow train another model class (pretrain.models.OBJECTIVES) with a
        # per-sample loss: there are no in-batch negatives for gradient caching to widen
        _check(not (self.grad_cache and objective_of(self.loss) != "contrastive"),
               f"train.grad_cache applies to the contrastive losses only, not train.loss={self.loss}")
        # gradient caching replays d loss / d (features, scale) only; SigLIP's bias has no path there
        _check(not (self.grad_cache and self.loss == "siglip"),
               "train.grad_cache supports the softmax losses (clip, clip_tiled, clip_ring) only, not train.loss=siglip")
        _check(self.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be >= 1")
        _check(self.logit_scale_max > 1, "train.logit_scale_max must be > 1")

    @property
    def max_logit_log_scale(self) -> float:
        return math.log(self.logit_scale_max)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = only at the end (and on preemption)
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint of the run dir
    # with resume=false: delete an earlier run's checkpoints, metrics, eval results and MLflow
    # run id from the run dir first (without it such a run dir is refused: two runs would mix)
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        _check(not (self.overwrite and self.resume),
               "checkpoint.overwrite=true deletes the run dir's earlier run: it goes with checkpoint.resume=false")


@dataclass
class EvalConfig:
    """Periodic evaluation on rank 0. Dataset specs are `pretrain.eval.load_eval_dataset`'s:
    `packaged:fashion-mnist`, `wds:/val/{0..3}.tar`, `captions:/val/manifest.json`, ..."""

    every_steps: int = 0  # 0 = only at the end
    at_end: bool = True
    zeroshot_dataset: str = ""  # "" = no zero-shot eval
    zeroshot_split: str = "test"
    templates: Any = "auto"  # a template-set name or a list of "... {} ..." strings
    retrieval_dataset: str = ""  # "" = no retrieval eval
    retrieval_split: str = "test"
    limit: int = 0  # > 0: evaluate a fixed subset of this many items
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps must be >= 0")
        _check(self.limit >= 0 and self.batch_size >= 1, "eval.limit must be >= 0 and eval.batch_size >= 1")
        if isinstance(self.templates, list):
            bad = [t for t in self.templates if "{}" not in str(t)]
            _check(not bad, f"eval.templates entries need a '{{}}' placeholder: {bad}")

    @property
    def enabled(self) -> bool:
        return bool(self.zeroshot_dataset or self.retrieval_dataset)


@dataclass
class LoggingConfig:
    every_steps: int = 10
    mlflow: bool = True
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db
    experiment: str = "clip-pretrain"
    run_name: str = ""  # "" = the run dir's name
    log_model: bool = True  # a finished run logs its final model as an MLflow pyfunc model
    registered_model_name: str = ""  # "" = not registered; else that model version is created
    # <run dir>/training_curves.png (matplotlib on rank 0, ~1 CPU-s per drawing), redrawn after
    # each evaluation and at the end and logged to MLflow; false: not drawn
    figure: bool = True
    # The console's step line: "paced" = every ~10% of the steps or ~30 s (pretrain/progress.py),
    # "every" = at every logging step. metrics.jsonl and MLflow get every logging step either way.
    console: str = "paced"

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "logging.every_steps must be >= 1")
        _check(self.console in ("paced", "every"), f"logging.console must be paced or every, not {self.console!r}")
        name = self.registered_model_name
        _check(not name or (name.strip() and not set(name) & set("/:")),  # MLflow's name rule
               f"logging.registered_model_name {name!r}: must not be blank or contain '/' or ':'")
        _check(not name or self.log_model, "logging.registered_model_name needs logging.log_model=true")


@dataclass
class RunConfig:
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir (the run directory) must be set")
        _check(self.steps_per_epoch() >= 1,
               f"data.samples_per_epoch ({self.data.samples_per_epoch}) is smaller than one global "
               f"batch ({self.train.global_batch}): an epoch would have no step")
        _check(self.schedule.warmup_steps == 0 or self.schedule.warmup_steps < self.total_steps(),
               f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be smaller than the "
               f"total number of steps ({self.total_steps()})")
        _check(not (self.optimizer.impl == "cpu_adam" and not self.train.offload_optimizer),
               "optimizer.impl=cpu_adam only makes sense with train.offload_optimizer=true")
        self._resolve_siglip()
        from pretrain.loss import objective_of

        _check(not (self.eval.retrieval_dataset and objective_of(self.train.loss) != "contrastive"),
               f"eval.retrieval_dataset needs a contrastive model (text embeddings); train.loss="
               f"{self.train.loss} trains a {objective_of(self.train.loss)} model: evaluate it zero-shot only")

    def _resolve_siglip(self) -> None:
        """SigLIP needs the model's learnable bias and the paper's init (scale 10, bias -10):
        written into model.overrides, so run_config.yaml re-creates the same model."""
        ov = self.model.overrides
        if self.train.loss == "siglip":
            from pretrain.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE

            ov.setdefault("init_logit_scale", SIGLIP_INIT_LOG_SCALE)
            if ov.get("init_logit_bias") is None:
                ov["init_logit_bias"] = SIGLIP_INIT_BIAS
        else:
            _check(ov.get("init_logit_bias") is None,
                   f"model.overrides.init_logit_bias adds a SigLIP logit bias, which train.loss="
                   f"{self.train.loss!r} does not use; set train.loss=siglip or drop the override")

    # --- derived quantities (one source of truth for batch arithmetic) -------------------
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, identical on every rank."""
        return self.data.samples_per_epoch // self.train.global_batch

    def total_steps(self) -> int:
        full = self.train.epochs * self.steps_per_epoch()
        return min(full, self.train.max_steps) if self.train.max_steps > 0 else full

    def grad_accum(self, world_size: int) -> int:
        return self.train.global_batch // (world_size * self.train.micro_batch)

    def validate(self, world_size: int) -> None:
        """Checks that need the launch size; raises ValueError with the fix in the message."""
        t = self.train
        _check(world_size >= 1, "world_size must be >= 1")
        _check(t.global_batch % (world_size * t.micro_batch) == 0,
               f"train.global_batch ({t.global_batch}) must be divisible by world_size x "
               f"train.micro_batch ({world_size} x {t.micro_batch} = {world_size * t.micro_batch})")
