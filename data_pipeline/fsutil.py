"""The data build's file helpers: the project's one fs module, `pretrain.fs`, under the name
the build's modules import (atomic writes, JSON I/O, globbing, the temp-file sweeper).

Every file the data build publishes goes through :func:`atomic_open`, so a reader never sees
a half-written tar, parquet or manifest: after a crash (even ``kill -9``) a path either holds
the complete file or does not exist, and a rerun only has to check existence to know what is
finished.
"""
from __future__ import annotations

from pretrain.fs import (  # noqa: F401 - re-exported
    TMP_MARK,
    atomic_open,
    dumps_json,
    exists,
    glob,
    is_local,
    join,
    makedirs,
    read_bytes,
    read_json,
    remove_stale_tmp,
    url_to_fs,
    write_bytes,
    write_json,
    write_text,
)
