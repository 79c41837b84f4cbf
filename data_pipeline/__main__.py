"""``python -m data_pipeline {build,crawl,filter,shard,stats} ...`` (see data_pipeline.cli).

The ``__main__`` guard matters: img2dataset starts its workers with the "spawn" method,
which re-imports this module in every child.
"""
import sys

from data_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
