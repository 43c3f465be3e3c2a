"""Secrets: read them one way everywhere, and keep them out of every text rankwatch writes.

Every secret rankwatch reads (Slack bot token and webhook URL, Grafana token, the detector's
bearer token and basic-auth password) comes through ``read_secret_file`` or ``secret_from_env``:
one line of printable ASCII (header-safe), at most ``MAX_SECRET_BYTES``. Anything else (a second line, a
control character, binary data, a directory, a FIFO, a huge file such as a log) is a
``SecretError`` that names the file or variable and never shows what is in it: a token file
with a stray second line used to put the whole token into HTTP header errors, and
``bot_token_file = "/etc/shadow"`` used to print that file.

Each secret read is remembered, so ``redact(text)`` can replace it (and, for URLs, its path) in
any error text before that text is logged, stored in the alert outbox or printed. Notifiers
call ``redact`` on what they log and store; ``RedactingFilter`` does it for log records
(including tracebacks) of loggers whose messages rankwatch does not build, such as
slack_sdk's."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

from rankwatch.errors import ConfigError

__all__ = ["MAX_SECRET_BYTES", "REDACTED", "RedactingFilter", "SecretError", "check_secret", "read_secret_file",
           "redact", "register_secret", "secret_from_env"]

# Far above any token (Slack's are < 100 bytes, JWTs a few kB); stops /dev/zero and log files.
MAX_SECRET_BYTES = 16 * 1024
REDACTED = "[REDACTED]"
# Shorter values would redact ordinary words out of every message; no real token is this short.
MIN_REDACT_LEN = 6

_lock = threading.Lock()
_known: set[str] = set()


class SecretError(ConfigError):
    """A secret file or variable is missing, unreadable or not one line of printable characters.
    The message names the file or variable, never the content."""


def check_secret(value: str, where: str, what: str | None = None) -> str:
    """``value`` as a header-safe secret: the final newline and surrounding spaces removed, then
    one line of printable ASCII, registered for ``redact``. Else a SecretError naming ``where``
    ("file /run/secrets/x", "environment variable X") and ``what`` ("bearer token"), never the
    value."""
    label = f"{where} ({what})" if what else where
    text = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    text = text.strip(" ")
    if not text.strip():
        raise SecretError(f"{label} is empty")
    if "\n" in text or "\r" in text:
        n = len(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        raise SecretError(f"{label} holds more than one line ({n} lines); a secret must be one line "
                          "(content not shown)")
    if not all(" " <= c <= "~" for c in text):
        raise SecretError(f"{label} holds control, non-ASCII or non-printable characters (content not shown)")
    register_secret(text)
    return text


def read_secret_file(path: str | os.PathLike[str], what: str = "secret", *, allow_empty: bool = False) -> str:
    """The secret in ``path`` (one line; surrounding whitespace and the final newline removed),
    registered for ``redact``. Raises SecretError naming the file; an empty file is an error
    unless ``allow_empty`` (then "" is returned: "not configured")."""
    p = Path(path).expanduser()
    where = f"file {p}"
    try:
        # O_NONBLOCK: a FIFO must not hang the caller; fstat below rejects it anyway.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SecretError(f"cannot read {where} ({what}): {exc.strerror or type(exc).__name__}") from None
    except ValueError:  # a NUL byte in the path
        raise SecretError(f"cannot read {where!r} ({what}): the path holds a NUL byte") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SecretError(f"{where} ({what}) is not a regular file")
        data = b""
        while len(data) <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise SecretError(f"cannot read {where} ({what}): {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{where} ({what}) is larger than {MAX_SECRET_BYTES} bytes: not a secret (content not shown)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where} ({what}) is not UTF-8 text (content not shown)") from None
    if allow_empty and not text.strip():
        return ""
    return check_secret(text, where, what)


def secret_from_env(name: str, environ: Mapping[str, str] | None = None, *, what: str = "secret") -> str | None:
    """The secret in environment variable ``name`` (None when unset or blank), checked like a
    file's and registered for ``redact``."""
    env = os.environ if environ is None else environ
    value = env.get(name, "")
    if not value.strip():
        return None
    return check_secret(value, f"environment variable {name}", what)


def register_secret(value: str) -> None:
    """Remember ``value`` (and the forms it takes in URLs and error texts) for ``redact``."""
    forms = {value, quote(value, safe="")}
    parts = urlsplit(value) if "://" in value else None
    if parts is not None and parts.netloc:
        # An error may show only the path of a webhook URL (its secret part).
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(path.strip("/")) >= MIN_REDACT_LEN:
            forms.add(path)
    with _lock:
        _known.update(f for f in forms if len(f) >= MIN_REDACT_LEN)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[REDACTED]``."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)  # a URL before its own path
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Redacts a record's message and traceback. Attach it to a handler to cover every logger,
    or to a logger for the records logged on that logger itself (e.g. slack_sdk's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
