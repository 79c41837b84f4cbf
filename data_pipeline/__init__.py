"""Data build: URL+caption lists -> img2dataset crawl -> filter -> sharded webdataset tars.

Run ``python -m data_pipeline --help``.

Importing this package (any of its modules, any entry point) sets
``NO_ALBUMENTATIONS_UPDATE=1`` first: img2dataset imports albumentations, which otherwise
makes an outbound version check at import time, from the crawl host and every worker that
inherits this environment (the crawl hands the setting to Spark/Ray workers explicitly).
"""
import os

# Forced, not a default: a crawl host must not phone home whatever the caller's shell says.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

__version__ = "0.1.0"
