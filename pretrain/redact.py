"""Credentials out of anything logged or saved as a shared artifact: `redact(text)`.

Run configs and build configs carry URLs, and URLs carry secrets: userinfo
(`https://user:password@host/...`, `https://<token>@host/...`), presigned query strings
(S3 `X-Amz-Signature` / `X-Amz-Credential` / `X-Amz-Security-Token`, GCS `X-Goog-Signature` /
`X-Goog-Credential`, Azure SAS `sig=`, CloudFront `Signature` / `Policy` / `Key-Pair-Id`) and
token-like parameters (`token`, `access_token`, `api_key`, `key`, `password`, `secret`...), and
`pipe:curl -H "Authorization: Bearer ..."` commands carry headers. `redact` replaces each secret
with `***` and leaves the rest of the text as it was (host, path and harmless parameters stay
readable), so it can be applied to any string: a URL, a YAML dump, a log line, a traceback.

    redact("https://u:p@h/x.tar?X-Amz-Signature=abc&n=1")  -> "https://***@h/x.tar?X-Amz-Signature=***&n=1"
    redact_tree({"data": {"sources": [...]}})             -> the same tree, every string redacted
    install_log_redaction()                               -> every log record redacted from now on

No imports from this project: every layer (data build, trainer, eval) may use it.
"""
from __future__ import annotations

import logging
import re
import traceback
from typing import Any

MASK = "***"

# scheme://userinfo@ : userinfo ends at the last "@" before the authority ends ("/", "?", "#",
# whitespace or a quote), so a raw "@" inside a password is covered too.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s\"'<>]*@")
_SECRET_PARAM = (r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
                 r"|sig|signature|policy|key-pair-id|[a-z0-9_.\-]*token|[a-z0-9_.\-]*secret[a-z0-9_.\-]*"
                 r"|password|passwd|pwd|api[_\-]?key|apikey|key|access[_\-]?key[a-z0-9_\-]*|auth|credentials?")
# ?name=value / &name=value / ;name=value: the value runs to the next separator, quote or blank.
_QUERY = re.compile(rf"(?i)([?&;](?:{_SECRET_PARAM})=)[^&;#\s\"'<>]*")
_AUTH_HEADER = re.compile(r"(?i)(authorization\s*:\s*(?:bearer\s+|basic\s+|token\s+)?)[^\s\"']+")


def redact(text: str) -> str:
    """`text` with URL userinfo, secret query values and Authorization header values masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON/YAML-like tree (dicts, lists, tuples, scalars) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj


def install_log_redaction() -> None:
    """Redact every log record of this process (all loggers, all handlers, also ones added
    later): the message is formatted and redacted when the record is made, and so is the
    traceback of `log.exception(...)`. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: the handler reports it as usual
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact(text)  # Formatter.format uses exc_text when it is set
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    factory._redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
