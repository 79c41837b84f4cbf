"""Pass 1 of the filter for ONE tar, as a separate job (a Slurm array task, a submitit
job, a node of the crawl's distributor). Run ``global_pass`` once all tars are done.

    python -m data_pipeline.filter.worker --tar crawl/00007.tar --work-dir work [--config filter.yaml]
    python -m data_pipeline.filter.worker --global --work-dir work [--config filter.yaml]

Slurm job array over a list of tars (one per line in tars.txt):

    sbatch --array=0-$(($(wc -l < tars.txt) - 1)) --wrap \
      'python -m data_pipeline.filter.worker --tar "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" tars.txt)" --work-dir work --config filter.yaml'
    sbatch --dependency=afterok:<array job id> --wrap \
      'python -m data_pipeline.filter.worker --global --tar-list tars.txt --work-dir work --config filter.yaml'

With submitit: ``executor.map_array(lambda t: filter_shard(t, work, cfg), tars)`` then
``global_pass(work, cfg, tars)``. The config file is YAML: either the filter settings
themselves or a file with a top-level ``filter:`` section.
"""
from __future__ import annotations

import argparse
import json
import sys

import fsspec
import yaml

from data_pipeline.filter.config import FilterConfig
from data_pipeline.filter.global_pass import global_pass
from data_pipeline.filter.shard_pass import filter_shard


def load_config(path: str | None) -> FilterConfig:
    if not path:
        return FilterConfig()
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if isinstance(data, dict) and isinstance(data.get("filter"), dict):
        data = data["filter"]
    return FilterConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.filter.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tar", help="one input tar (fsspec URL): run pass 1 on it")
    what.add_argument("--global", dest="global_", action="store_true", help="run pass 2 over all per-shard records")
    p.add_argument("--work-dir", required=True, help="filter work directory (fsspec URL)")
    p.add_argument("--config", help="YAML file with the filter settings (or a `filter:` section)")
    p.add_argument("--tar-list", help="with --global: a file listing the input tars, one per line "
                   "(default: every per-shard record under the work dir)")
    p.add_argument("--force", action="store_true", help="recompute even if the per-shard record is up to date")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.tar:
        out = filter_shard(args.tar, args.work_dir, cfg, force=args.force)
        print(out)
    else:
        tars = None
        if args.tar_list:
            with fsspec.open(args.tar_list, "rt", encoding="utf-8") as f:
                tars = [line.strip() for line in f if line.strip()]
        res = global_pass(args.work_dir, cfg, tars)
        print(json.dumps({"total_in": res.total_in, "kept": res.n_kept, "counts": res.counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
