"""``clip-data`` / ``python -m data_pipeline``: build an image-text dataset from a URL list.

    clip-data build --urls urls.parquet --output out/ [--config build.yaml] [--crawl.timeout=5 ...]
    clip-data build --output out/ --retry-failed   # fetch the transient failures again, rebuild
    clip-data crawl  --urls urls.parquet --output out/     # stages alone, in this order
    clip-data filter --output out/
    clip-data shard  --output out/
    clip-data stats  --output out/

Any config key is an option: ``--section.key=value`` (``--help`` lists them all). A later
stage reuses the config saved in ``out/build_config.json``; rerunning a killed command
continues where it stopped.

Progress: a bar per stage on a terminal; in a file or pipe a line every ~10% or ~30 s with
rate and ETA (pretrain/progress.py). img2dataset's own output goes to
``out/crawl/img2dataset.log`` unless ``--verbose``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from pretrain.config.engine import ConfigError, describe, parse_value

DESCRIPTION = "Build an image-text dataset from a URL list: crawl (img2dataset) -> filter -> webdataset shards."
STAGES = {
    "build": "crawl, filter and shard in one go, then print the stats",
    "crawl": "download the URL list with img2dataset into OUT/crawl (safety-checked, resumable)",
    "filter": "apply the filter rules and global dedup to the crawl (needs a finished crawl)",
    "shard": "write the kept samples as webdataset tars + manifest.json (needs filter)",
    "stats": "re-derive stats.json / stats.md from OUT and print the summary table",
}
_WITH_INPUT = ("build", "crawl")


def _show(value: Any) -> str:
    """A default as one would type it on the command line (YAML spelling)."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def _config_help() -> str:
    from data_pipeline.config import BuildConfig

    lines = ["config keys (--key=value, or in the YAML file given by --config):"]
    for key, typ, default, doc in describe(BuildConfig):
        if key in ("urls", "output"):
            continue
        lines.append(f"  --{key}={_show(default)}  [{typ}]" + (f"  {doc}" if doc else ""))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clip-data", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `clip-data COMMAND --help` for a command's options.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    epilog = _config_help()
    for name, text in STAGES.items():
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in _WITH_INPUT:
            p.add_argument("--urls", help="URL list: txt/csv/tsv/parquet/jsonl file or a directory of them")
        p.add_argument("--output", "-o", help="output directory (fsspec URL)", required=name not in _WITH_INPUT)
        p.add_argument("--config", help="YAML config file (keys as listed below)")
        p.add_argument("--processes", type=int, help="worker processes (0: all cores)")
        p.add_argument("--verbose", action="store_true",
                       help="show img2dataset's own output (default: it goes to OUT/crawl/img2dataset.log)")
        if name in _WITH_INPUT:
            p.add_argument("--distributor", choices=["multiprocessing", "pyspark", "ray"],
                           help="img2dataset distributor (default multiprocessing)")
            p.add_argument("--allow-private-addresses", action="store_true", default=None,
                           help="crawl loopback/private hosts too (for a local test server)")
            p.add_argument("--retry-failed", action="store_true",
                           help="once the crawl is complete, fetch again only the samples that failed "
                                "transiently (timeouts, 429/503, deadlines, ...) into new crawl shards")
    return ap


def _split_overrides(rest: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=v``, ``--a.b v`` and bare ``--flag`` (= true) into (key, value) pairs."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: config keys are given as --key=value")
        if "=" not in tok and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            tok = f"{tok}={rest[i + 1]}"
            i += 1
        key, eq, text = tok[2:].partition("=")
        out.append((key.replace("-", "_"), parse_value(text) if eq else True))
        i += 1
    return out


def _resolve(args: argparse.Namespace, rest: list[str]) -> Any:
    from data_pipeline import fsutil
    from data_pipeline.config import load_config
    from data_pipeline.layout import Layout, saved_config

    overrides = _split_overrides(rest)
    flags = {"urls": getattr(args, "urls", None), "output": args.output, "processes": args.processes,
             "crawl.distributor": getattr(args, "distributor", None),
             "crawl.allow_private_addresses": getattr(args, "allow_private_addresses", None)}
    overrides = [(k, v) for k, v in flags.items() if v is not None] + overrides
    output = args.output or dict(overrides).get("output")
    base = saved_config(Layout(str(output).rstrip("/"))) if output else None
    if args.command in _WITH_INPUT and not (args.urls or dict(overrides).get("urls") or (base or {}).get("urls")):
        raise ConfigError("no URL list given: pass --urls FILE_OR_DIR")
    if args.config and not fsutil.exists(args.config):
        raise ConfigError(f"config file not found: {args.config}")
    return load_config(args.config, overrides, base=base)


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.verbose:
        from pretrain.progress import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # read by the stages and their worker processes
    from pretrain.redact import install_log_redaction, redact

    install_log_redaction()
    from data_pipeline import pipeline
    from data_pipeline.crawl import CrawlIncompleteError, DistributorUnavailableError
    from data_pipeline.inputs import InputError
    from data_pipeline.layout import OutputMismatchError

    try:
        cfg = _resolve(args, rest)
        stage: Callable[..., Any] = {"build": pipeline.build, "crawl": pipeline.crawl, "filter": pipeline.filter,
                                     "shard": pipeline.shard, "stats": pipeline.stats}[args.command]
        if getattr(args, "retry_failed", False):
            stage(cfg, retry_failed=True)
        else:
            stage(cfg)
    except (ConfigError, InputError, OutputMismatchError, pipeline.StageOrderError, DistributorUnavailableError) as e:
        print(f"clip-data {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except CrawlIncompleteError as e:
        print(f"clip-data {args.command}: {redact(str(e))}", file=sys.stderr)
        return 3
    if args.command in ("crawl", "filter", "shard"):
        print(f"clip-data {args.command}: done ({redact(cfg.output)})", flush=True)
    return 0
