"""Reading secrets (tokens, passwords) from files.

A secret file holds one line of printable ASCII characters (a trailing newline is fine). Anything
else — a second line, control characters, a binary or huge file, ``/etc/shadow`` by mistake — is
a clear error that names the file and never shows what is in it: the content could be the
secret, or someone else's."""

from __future__ import annotations

import os

from rankwatch.errors import ConfigError

# Far above any token (Slack's are < 100 bytes, JWTs a few kB); stops /dev/zero and log files.
MAX_SECRET_BYTES = 16 * 1024


def check_secret(value: str, where: str, what: str) -> str:
    """``value`` as a header-safe secret, or a ConfigError naming ``where`` (never the value)."""
    text = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if not text.strip():
        raise ConfigError(f"{what} ({where}) is empty")
    if "\n" in text or "\r" in text:
        n = len(text.replace("\r\n", "\n").replace("\r", "\n").splitlines())
        raise ConfigError(f"{what} ({where}) must be one line, found {n} lines (content not shown)")
    if text != text.strip() or not all(" " <= c <= "~" for c in text):
        raise ConfigError(f"{what} ({where}) must be printable ASCII without surrounding spaces "
                          "(content not shown)")
    return text


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    """The secret in ``path``: one line of printable characters, else a ConfigError that names
    the file and never prints its content."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} file {os.fspath(path)}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise ConfigError(f"{what} file {os.fspath(path)}: larger than {MAX_SECRET_BYTES} bytes, not a secret "
                          "(content not shown)")
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {os.fspath(path)}: must be printable ASCII (content not shown)") from None
    return check_secret(value, f"file {os.fspath(path)}", what)
