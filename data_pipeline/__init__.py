"""Data build: URL+caption lists -> img2dataset crawl -> filter -> sharded webdataset tars.

Run ``python -m data_pipeline --help``.
"""
__version__ = "0.1.0"
