"""Credential redaction: no secret reaches a message or a log line."""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


# Values that must never reach a message or a log line. Filled from the environment on each
# call and from the credentials every S3 client resolved (profiles, SSO, instance roles).
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


_known_secrets: set[str] = set()


_secrets_lock = threading.Lock()


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


_SIGNING = re.compile(
    r"(?i)(Credential=|X-Amz-Credential=|X-Amz-Security-Token[=:]\s*|X-Amz-Signature=|Signature=|"
    r"aws_secret_access_key\s*=\s*|aws_session_token\s*=\s*)[^\s,&'\"]+"
)


def remember_secret(*values: str | None) -> None:
    """Add credential values to the set that ``redact`` removes (short values are ignored)."""
    with _secrets_lock:
        _known_secrets.update(v for v in values if v and len(v) >= 8)


def redact(text: str) -> str:
    """``text`` with credentials removed: known key/secret/token values, URL userinfo, signatures."""
    if not text:
        return text
    with _secrets_lock:
        secrets = set(_known_secrets)
    secrets.update(v for k in _SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8)
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNING.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites every record through ``redact`` (attach it to handlers:
    filters on a logger do not see records propagated from its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not kill logging
            return True
        clean = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback text is rendered later by the formatter: render it now, redacted.
            import traceback

            clean += "\n" + redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a ``RedactingFilter`` to every handler of ``logger`` (default: the root logger),
    and keep botocore/urllib3 wire logs (which carry signed headers) at INFO or above."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.INFO:
            lg.setLevel(logging.INFO)
