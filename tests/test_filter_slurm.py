"""Pass 1 of the filter as a real Slurm job array (one tar per array task, the command of
data_pipeline/filter/worker.py's docstring), then the global pass as a dependent job: the
decisions equal the local filter_stage's."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.filter import FilterConfig, filter_stage
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from test_filter_stage import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_job_array_then_global_job(slurm_cluster, tmp_path):  # noqa: F811
    tars, expected = build_dataset(tmp_path)
    (tmp_path / "tars.txt").write_text("\n".join(tars) + "\n")
    (tmp_path / "filter.yaml").write_text("filter:\n  dedup:\n    phash_distance: 4\n")
    py = sys.executable
    env = {"PYTHONPATH": str(ROOT)}
    array = tmp_path / "array.sh"
    array.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f'{py} -m data_pipeline.filter.worker --tar "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" tars.txt)" '
        "--work-dir work --config filter.yaml\n")
    merge = tmp_path / "merge.sh"
    merge.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f"{py} -m data_pipeline.filter.worker --global --tar-list tars.txt --work-dir work --config filter.yaml\n")
    common = ["--chdir", str(tmp_path), "--ntasks=1", "--cpus-per-task=1"]
    job = slurm_cluster.sbatch(array, sbatch_args=[*common, f"--array=0-{len(tars) - 1}",
                                                   "--output", str(tmp_path / "array-%A_%a.log")], env=env)
    final = slurm_cluster.sbatch(merge, sbatch_args=[*common, f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes",
                                                     "--output", str(tmp_path / "merge.log")], env=env)
    info = slurm_cluster.wait_done(final, timeout=240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert info["JobState"] == "COMPLETED", logs
    assert sorted(p.name for p in (tmp_path / "work" / "per_shard").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]

    dec = pd.read_parquet(tmp_path / "work" / "decisions.parquet")
    assert {(Path(t).name, k): d for t, k, d in zip(dec["source_tar"], dec["key"], dec["decision"])} == expected
    local = filter_stage(tars, str(tmp_path / "local"), FilterConfig(), processes=1)
    kept = dec[dec["decision"] == "kept"].drop(columns=["decision"]).reset_index(drop=True)
    kept["balance_entries"] = kept["balance_entries"].map(list)
    pd.testing.assert_frame_equal(kept, local.kept)
