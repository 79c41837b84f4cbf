"""Read a URL list (txt/csv/tsv/parquet/jsonl, one file or a directory of them) into a
normalised Arrow table: ``url`` (string), ``caption`` (string, when a caption column is
configured) and the extra columns to keep.

Bad input is a clear :class:`InputError` naming the file and column (missing file, missing
column, a column that is not text). Undecodable caption bytes become U+FFFD, which the
filter stage counts as a caption-encoding rejection rather than crashing the crawl.

    files, fmt = list_input_files("urls/", "auto")
    table = read_url_table(files[0], fmt, url_col="url", caption_col="caption", extra_columns=None)
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_pipeline import fsutil

FORMATS = ("txt", "csv", "tsv", "parquet", "jsonl")
# Columns img2dataset reserves for itself, plus the row id this build adds: extra input
# columns with these names are kept under "src_<name>".
RESERVED = {
    "key", "caption", "url", "width", "height", "original_width", "original_height", "status",
    "error_message", "exif", "md5", "sha256", "sha512", "input_row", "jpg", "txt", "json",
}
_EXT = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


class InputError(ValueError):
    """The URL list cannot be read as configured; the message says what to change."""


def detect_format(path: str) -> str:
    for ext, fmt in _EXT.items():
        if path.lower().endswith(ext):
            return fmt
    raise InputError(f"cannot tell the format of {path!r} from its name: set crawl.input_format to one of {FORMATS}")


def list_input_files(urls: str, input_format: str = "auto") -> tuple[list[str], str]:
    """The input files (sorted, for a directory) and their format."""
    if not urls:
        raise InputError("no URL list given: pass --urls FILE_OR_DIR")
    fs, path = fsutil.url_to_fs(urls)
    if not fs.exists(path):
        raise InputError(f"URL list not found: {urls}")
    if fs.isdir(path):
        formats = [input_format] if input_format != "auto" else list(FORMATS)
        for fmt in formats:
            exts = [e for e, f in _EXT.items() if f == fmt]
            found = sorted({m for e in exts for m in fsutil.glob(fsutil.join(urls, "*" + e))})
            if found:
                return found, fmt
        raise InputError(f"no {'/'.join(formats)} files in directory {urls}")
    return [urls], (detect_format(urls) if input_format == "auto" else input_format)


def _read_raw(file: str, fmt: str, columns: list[str] | None, header: bool) -> pa.Table:
    fs, path = fsutil.url_to_fs(file)
    with fs.open(path, "rb") as f:
        if fmt == "txt":
            lines = f.read().decode("utf-8", errors="replace").splitlines()
            return pa.table({"url": [ln.strip() for ln in lines if ln.strip()]})
        if fmt in ("csv", "tsv"):
            read = pa_csv.ReadOptions(autogenerate_column_names=not header, block_size=1 << 24)
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            return pa_csv.read_csv(f, read_options=read, parse_options=parse)
        if fmt == "jsonl":
            return pa_json.read_json(f)
        if fmt == "parquet":
            if columns is not None:
                names = pq.read_schema(f).names
                f.seek(0)
                missing = [c for c in columns if c not in names]
                if missing:
                    raise InputError(_missing_msg(file, missing, names))
            return pq.read_table(f, columns=columns)
    raise InputError(f"unknown input format {fmt!r}; use one of {FORMATS}")


def _missing_msg(file: str, missing: Sequence[str], names: Sequence[str]) -> str:
    return (
        f"{file}: column(s) {', '.join(repr(m) for m in missing)} not found; it has "
        f"{', '.join(repr(n) for n in names)}. Set crawl.url_col / crawl.caption_col / "
        "crawl.extra_columns to existing columns (crawl.caption_col=null for no captions)."
    )


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A column as UTF-8 strings (nulls kept), or None if it is not text-like."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        vals = [None if v is None else v.decode("utf-8", errors="replace") for v in col.to_pylist()]
        return pa.chunked_array([pa.array(vals, pa.string())])
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(len(col), pa.string())])
    return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _extra(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Keep simple scalar columns as they are; anything else as JSON text, so img2dataset
    can put it into each sample's json (a timestamp or bytes value would crash its writer)."""
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return col
    text = _as_text(col)
    if text is not None:
        return text
    vals = [None if v is None else json.dumps(_jsonable(v), sort_keys=True) for v in col.to_pylist()]
    return pa.chunked_array([pa.array(vals, pa.string())])


def read_url_table(
    file: str,
    fmt: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    extra_columns: Sequence[str] | None = None,
    header: bool = True,
) -> pa.Table:
    """Read one input file into columns ``url``, [``caption``], extras (see module doc)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; use one of {FORMATS}")
    if fmt == "txt":
        url_col, caption_col, extra_columns = "url", None, []
    wanted = None
    if fmt == "parquet" and extra_columns is not None:
        wanted = list(dict.fromkeys([url_col] + ([caption_col] if caption_col else []) + list(extra_columns)))
    try:
        raw = _read_raw(file, fmt, wanted, header)
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"URL list not found: {file}") from e
    except (pa.ArrowInvalid, OSError, UnicodeError, ValueError) as e:
        raise InputError(f"{file}: cannot read as {fmt}: {e}") from e
    names = raw.column_names
    needed = [url_col] + ([caption_col] if caption_col else []) + list(extra_columns or [])
    missing = [c for c in needed if c not in names]
    if missing:
        raise InputError(_missing_msg(file, missing, names))
    cols: dict[str, pa.ChunkedArray] = {}
    url = _as_text(raw.column(url_col))
    if url is None:
        raise InputError(f"{file}: URL column {url_col!r} holds {raw.column(url_col).type}, not text URLs")
    cols["url"] = pc.utf8_trim_whitespace(url)
    if caption_col:
        cap = raw.column(caption_col)
        text = _as_text(cap)
        if text is None:
            if pa.types.is_nested(cap.type):
                raise InputError(f"{file}: caption column {caption_col!r} holds {cap.type}, not text")
            text = cap.cast(pa.string())  # numbers or dates as captions: their text form
        cols["caption"] = text
    extras = [c for c in names if c not in (url_col, caption_col)] if extra_columns is None else list(extra_columns)
    for name in extras:
        out_name = f"src_{name}" if name in RESERVED else name
        cols[out_name] = _extra(raw.column(name))
    return pa.table(cols)
