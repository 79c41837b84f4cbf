"""The run config: typed sections (schema.py) and YAML + `--key=value` parsing (loader.py).

    from pretrain.config import load_config
    cfg = load_config("run.yaml", ["--train.zero_stage=3", "--train.precision=bf16"])
    cfg.validate(world_size)        # batch arithmetic against the launch size
"""

from pretrain.config.loader import deep_merge, flatten, from_dict, load_config, parse_overrides, save_config, to_dict
from pretrain.config.schema import (CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, ModelConfig,
                                    OptimizerConfig, RunConfig, ScheduleConfig, SourceConfig, TrainConfig)

__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "RunConfig", "ScheduleConfig", "SourceConfig", "TrainConfig", "deep_merge", "flatten", "from_dict",
    "load_config", "parse_overrides", "save_config", "to_dict",
]
