"""Secrets: read as one printable line through rankwatch.secrets, never shown in an error, a log,
the outbox or `rankwatch alerts outbox`, with the real slack_sdk client and the CLI."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from rankwatch.cli import main
from rankwatch.errors import ConfigError
from rankwatch.secrets import (
    REDACTED,
    RedactingFilter,
    SecretError,
    read_secret_file,
    redact,
    secret_from_env,
)
from rankwatch.sim.slack import SlackServer

SECOND_LINE = "xoxb-second-line-of-the-token-file"


def _config(path: Path, slack: SlackServer, token_file: Path) -> Path:
    path.write_text(f"""
[slack]
channel = "{slack.channel}"
api_url = "{slack.api_url}"
bot_token_file = "{token_file}"
max_retries = 0
timeout_s = 5

[notify]
group_wait_s = 0
close_timeout_s = 0
retry_interval_s = 0.2
""")
    return path


def _everything_written(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, state: Path) -> str:
    """Whatever a user could read afterwards: stdout, stderr, every log record (tracebacks
    included) and every byte of the state directory."""
    out, err = capsys.readouterr()
    handler_text = "\n".join(logging.Formatter("%(message)s").format(r) for r in caplog.records)
    files = "".join(p.read_bytes().decode("utf-8", "replace") for p in state.rglob("*") if p.is_file()) \
        if state.exists() else ""
    return out + err + handler_text + files


def test_token_file_with_two_lines_is_refused_and_never_shown(
        tmp_path: Path, slack: SlackServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # The fault as found: a token file with a stray second line put the whole token into
    # slack_sdk's ERROR line, rankwatch's WARNING, the outbox's last_error and `alerts outbox`.
    token_file = tmp_path / "slack-token"
    token_file.write_text(f"{slack.token}\n{SECOND_LINE}\n")
    cfg = _config(tmp_path / "rankwatch.toml", slack, token_file)
    state = tmp_path / "state"
    caplog.set_level(logging.DEBUG)

    assert main(["alerts", "send-test", "--config", str(cfg)]) == 2
    main(["alerts", "flush", "--config", str(cfg), "--state-dir", str(state)])
    main(["alerts", "outbox", "--state-dir", str(state)])
    seen = _everything_written(capsys, caplog, state)
    assert f"file {token_file} (slack.bot_token_file) holds more than one line" in seen
    assert slack.token not in seen and SECOND_LINE not in seen
    assert not slack.calls(ok_only=False), "nothing may be sent with a malformed token"


def test_a_system_file_named_as_token_is_refused_without_its_content(
        tmp_path: Path, slack: SlackServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # bot_token_file = "/etc/shadow" printed that file. A file of the same shape, so the test
    # needs no root: many lines of "name:hash:…".
    shadow = tmp_path / "shadow"
    shadow.write_text("".join(f"user{i}:$6$salt{i}$hashhashhash{i}:19000:0:99999:7:::\n" for i in range(20)))
    cfg = _config(tmp_path / "rankwatch.toml", slack, shadow)
    caplog.set_level(logging.DEBUG)
    assert main(["alerts", "send-test", "--config", str(cfg)]) == 2
    seen = _everything_written(capsys, caplog, tmp_path / "none")
    assert str(shadow) in seen
    assert "hashhash" not in seen and "user1:" not in seen


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"tok\x00en-secret-value", "non-printable"),
    (b"tok\ten-secret-value", "non-printable"),
    (b"secret-value-one\r\nsecret-value-two", "more than one line"),
    (b"\xff\xfe secret-value", "not UTF-8"),
    (b"\n\nsecret-value-first-line\n", "more than one line"),
    (b"x" * 20000, "larger than"),
    ("sécret-value".encode(), "non-ASCII"),
])
def test_secret_file_problems_name_the_file_not_the_content(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(SecretError) as info:
        read_secret_file(path, what="test token")
    msg = str(info.value)
    assert problem in msg and str(path) in msg
    assert "secret-value" not in msg and "xxxxxxxx" not in msg
    assert isinstance(info.value, ConfigError)  # the CLI prints it as a one-line user error


def test_secret_file_that_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="not a regular file"):
        read_secret_file(tmp_path, what="token")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SecretError, match="not a regular file"):  # and it does not hang waiting for a writer
        read_secret_file(fifo, what="token")
    with pytest.raises(SecretError, match="No such file"):
        read_secret_file(tmp_path / "absent", what="token")


def test_one_line_with_final_newline_is_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  xoxb-123-456-abcdef  \r\n")
    assert read_secret_file(path) == "xoxb-123-456-abcdef"
    assert secret_from_env("T", {"T": " xoxb-789 \n"}) == "xoxb-789"
    assert secret_from_env("T", {"T": "  "}) is None and secret_from_env("T", {}) is None
    with pytest.raises(SecretError, match="environment variable T") as info:
        secret_from_env("T", {"T": "xoxb-789\nsecond-line-secret"})
    assert "second-line-secret" not in str(info.value)


def test_redaction_covers_loaded_secrets_their_url_path_and_tracebacks(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("https://hooks.slack.com/services/T0RW/B0RW/redaction-test-secret\n")
    url = read_secret_file(hook, what="webhook")
    assert redact(f"POST {url} failed") == f"POST {REDACTED} failed"
    assert redact("bad path /services/T0RW/B0RW/redaction-test-secret") == f"bad path {REDACTED}"
    assert redact("nothing secret here") == "nothing secret here"

    # A logger whose message rankwatch does not build (slack_sdk's): the filter cleans the
    # message and the traceback before any handler formats them.
    logger = logging.getLogger("rankwatch.test.redaction")
    logger.addFilter(RedactingFilter())
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"Invalid header value {url!r}")
        except ValueError as exc:
            logger.error("Failed to send a request to Slack API server: %s", exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    [text] = records
    assert "redaction-test-secret" not in text and REDACTED in text and "Traceback" in text


def test_the_outbox_never_stores_a_secret(tmp_path: Path) -> None:
    from rankwatch.alerts.outbox import Outbox

    token = tmp_path / "token"
    token.write_text("xoxb-outbox-redaction-0123456789\n")
    secret = read_secret_file(token)
    ob = Outbox(tmp_path / "alerts.sqlite")
    with ob.transaction() as c:
        Outbox.enqueue(c, key="k", target="slack", scope="i1", action="firing", incident_id=1, episode=None,
                       now=1.0, not_before=1.0)
    [row] = ob.rows()
    ob.mark_failed(row.id, f"header 'Bearer {secret}' rejected", 2.0)
    dump = "\n".join(sqlite3.connect(tmp_path / "alerts.sqlite").iterdump())
    assert secret not in dump and REDACTED in dump
    ob.mark_given_up(row.id, f"refused {secret}")
    ob.close()
    dump = "\n".join(sqlite3.connect(tmp_path / "alerts.sqlite").iterdump())
    assert secret not in dump and "refused [REDACTED]" in dump
