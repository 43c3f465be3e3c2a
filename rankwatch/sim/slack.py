"""A local HTTP server speaking the parts of Slack's Web API and incoming webhooks that
rankwatch uses, for tests and the demo: the real slack_sdk clients talk to it unchanged
(``WebClient(base_url=server.api_url)``, ``WebhookClient(server.webhook_url)``).

Web API methods: ``auth.test``, ``chat.postMessage`` (threads, metadata), ``chat.update``,
``conversations.history`` and ``conversations.replies`` (with metadata), and the ``files_upload_v2`` sequence
(``files.getUploadURLExternal`` → POST to the returned upload URL → ``files.completeUploadExternal``).
Webhooks: POST ``/services/...`` answers ``ok`` like Slack.

It records every request and every message, checks the bearer token and Block Kit limits the
way Slack does (``invalid_auth``, ``invalid_blocks``), and can be told to answer the next N
requests with 429 + ``Retry-After`` or with 500, or to be slow: ``hold()`` processes and records
matching requests but keeps their answers back until ``release()`` (a Slack that posts the
message and answers after the client's timeout)."""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from rankwatch.httpserver import SIM_LIMITS, HttpServer


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    params: dict[str, Any]  # merged query string, form fields and JSON body
    status: int  # what the server answered
    time: float = field(default_factory=time.time)
    error: str | None = None  # the Web API's "error" when it answered ok: false

    @property
    def api_method(self) -> str | None:
        return self.path[len("/api/"):] if self.path.startswith("/api/") else None


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]] | None
    thread_ts: str | None = None
    metadata: dict[str, Any] | None = None
    via: str = "api"  # api | webhook
    edits: list[dict[str, Any]] = field(default_factory=list)  # earlier versions, oldest first
    files: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] | None = None  # legacy attachments (what Alertmanager sends)


class SlackServer:
    """``start()`` / ``stop()`` / ``url`` / ``requests``; see the module docstring."""

    def __init__(self, token: str = "xoxb-rankwatch-test", channel: str = "C0RANKWATCH", host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.token = token
        self.channel = channel
        self._host, self._port = host, port
        self.requests: list[RecordedRequest] = []
        self.messages: list[Message] = []
        self.uploads: dict[str, dict[str, Any]] = {}
        # [remaining count, status, retry_after, path predicate, Web API error code]
        self._faults: list[list[Any]] = []
        self._holds: list[Callable[[str], bool]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._server: HttpServer | None = None
        # Called (in the request's thread) after every request has been recorded and answered:
        # `rankwatch sim slack` rewrites its --dump file there.
        self.on_request: Callable[[RecordedRequest], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SlackServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                server._handle(self)

            def do_GET(self) -> None:
                server._handle(self)

        self._server = HttpServer(self._host, self._port, Handler, limits=SIM_LIMITS, name="rankwatch-sim-slack")
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> SlackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    @property
    def webhook_url(self) -> str:
        return self.url + "/services/T0RANKWATCH/B0RANKWATCH/sim-webhook-secret"

    # -- fault injection ---------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, retry_after: float | None = None,
                  match: Callable[[str], bool] | None = None, error: str | None = None) -> None:
        """Answer the next ``n`` matching requests (by path) with ``status`` (429 adds Retry-After);
        Web API calls get ``{"ok": false, "error": error}`` (default by status), e.g.
        ``fail_next(1, 200, error="missing_scope")``."""
        with self._lock:
            self._faults.append([n, status, retry_after, match or (lambda _p: True), error])

    def fail_always(self, status: int = 500) -> None:
        self.fail_next(10**9, status)

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def hold(self, match: Callable[[str], bool] | None = None) -> None:
        """Process and record matching requests (by path) as usual, but answer them only after
        ``release()``: the client sees a timeout although Slack did the work."""
        with self._lock:
            self._released.clear()
            self._holds.append(match or (lambda _p: True))

    def release(self) -> None:
        """Answer the held requests now, and stop holding."""
        with self._lock:
            self._holds.clear()
            self._released.set()

    # -- inspection ----------------------------------------------------------------------------

    def calls(self, api_method: str | None = None, *, ok_only: bool = True) -> list[RecordedRequest]:
        with self._lock:
            reqs = list(self.requests)
        out = [r for r in reqs if (api_method is None or r.api_method == api_method or
                                   (api_method == "webhook" and r.path.startswith("/services/")))]
        return [r for r in out if r.status == 200] if ok_only else out

    def top_level_messages(self) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.thread_ts is None]

    def thread(self, ts: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.thread_ts == ts]

    # -- request handling ----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parsed = urlparse(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        if body and ctype == "application/json":
            try:
                params.update(json.loads(body))
            except ValueError:
                pass
        elif body and ctype == "application/x-www-form-urlencoded":
            params.update({k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()})
        headers = {k: v for k, v in h.headers.items()}

        status, payload, extra_headers = self._fault_for(parsed.path)
        if status is None:
            status, payload, extra_headers = self._route(parsed.path, params, headers, body)
        error = payload.get("error") if isinstance(payload, dict) and not payload.get("ok", True) else None
        rec = RecordedRequest(h.command, parsed.path, headers, body, params, status, error=error)
        with self._lock:
            self.requests.append(rec)
            held = any(match(parsed.path) for match in self._holds)
        if held:
            self._released.wait()
        data = payload if isinstance(payload, bytes) else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        h.send_response(status)
        is_text = isinstance(payload, str | bytes)
        h.send_header("Content-Type", "text/plain; charset=utf-8" if is_text else "application/json; charset=utf-8")
        for k, v in extra_headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        if self.on_request is not None:
            self.on_request(rec)

    def _fault_for(self, path: str) -> tuple[int | None, Any, dict[str, str]]:
        with self._lock:
            for i, (left, status, retry_after, match, error) in enumerate(self._faults):
                if match(path):
                    if left <= 1:
                        del self._faults[i]
                    else:
                        self._faults[i][0] = left - 1
                    headers = {"Retry-After": str(int(retry_after if retry_after is not None else 1))} if status == 429 else {}
                    body: Any = "rate_limited" if status == 429 else "internal_error"
                    if path.startswith("/api/"):
                        body = {"ok": False, "error": error or ("ratelimited" if status == 429 else "internal_error")}
                    return status, body, headers
        return None, None, {}

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _route(self, path: str, p: dict[str, Any], headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/services/"):
            return self._webhook(body)
        if path.startswith("/upload/"):
            file_id = path.rsplit("/", 1)[-1]
            with self._lock:
                if file_id not in self.uploads:
                    return 404, "not found", {}
                self.uploads[file_id]["data"] = body
            return 200, "OK - " + str(len(body)), {}
        if not path.startswith("/api/"):
            return 404, "not found", {}
        method = path[len("/api/"):]
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else p.get("token")
        if token != self.token:
            return 200, {"ok": False, "error": "not_authed" if not token else "invalid_auth"}, {}
        handler = getattr(self, "_api_" + method.replace(".", "_"), None)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method"}, {}
        return 200, handler(p), {}

    def _webhook(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return 400, "invalid_payload", {}
        if not payload.get("text") and not payload.get("blocks") and not payload.get("attachments"):
            return 400, "no_text", {}
        if payload.get("blocks") is not None and not _blocks_ok(payload["blocks"]):
            return 400, "invalid_blocks", {}
        with self._lock:
            self.messages.append(Message(self.channel, self._next_ts(), payload.get("text", ""), payload.get("blocks"),
                                         via="webhook", attachments=payload.get("attachments")))
        return 200, "ok", {}

    # Web API methods -----------------------------------------------------------------------------

    def _api_auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": "https://rankwatch-sim.slack.com/", "team": "sim", "user": "rankwatch",
                "team_id": "T0RANKWATCH", "user_id": "U0RANKWATCH", "bot_id": "B0RANKWATCH"}

    def _blocks_param(self, p: dict[str, Any]) -> list[dict[str, Any]] | None | bool:
        blocks = p.get("blocks")
        if isinstance(blocks, str):
            try:
                blocks = json.loads(blocks)
            except ValueError:
                return False
        if blocks is not None and not _blocks_ok(blocks):
            return False
        return blocks

    def _api_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:  # Slack's method name
        channel = p.get("channel")
        if channel != self.channel:
            return {"ok": False, "error": "channel_not_found"}
        blocks = self._blocks_param(p)
        if blocks is False:
            return {"ok": False, "error": "invalid_blocks"}
        if not p.get("text") and not blocks:
            return {"ok": False, "error": "no_text"}
        metadata = p.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        with self._lock:
            thread_ts = p.get("thread_ts")
            if thread_ts and not any(m.ts == thread_ts for m in self.messages):
                return {"ok": False, "error": "thread_not_found"}
            msg = Message(channel, self._next_ts(), p.get("text", ""), blocks or None, thread_ts=thread_ts, metadata=metadata)
            self.messages.append(msg)
        return {"ok": True, "channel": channel, "ts": msg.ts, "message": {"text": msg.text, "ts": msg.ts}}

    def _api_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        blocks = self._blocks_param(p)
        if blocks is False:
            return {"ok": False, "error": "invalid_blocks"}
        with self._lock:
            for m in self.messages:
                if m.channel == p.get("channel") and m.ts == p.get("ts"):
                    m.edits.append({"text": m.text, "blocks": m.blocks})
                    m.text = p.get("text", m.text)
                    m.blocks = blocks or m.blocks
                    return {"ok": True, "channel": m.channel, "ts": m.ts, "text": m.text}
        return {"ok": False, "error": "message_not_found"}

    def _api_conversations_history(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("channel") != self.channel:
            return {"ok": False, "error": "channel_not_found"}
        oldest = float(p.get("oldest") or 0)
        with self._lock:
            msgs = [m for m in self.messages if m.thread_ts is None and float(m.ts.split(".")[0]) >= int(oldest)]
        out = []
        for m in reversed(msgs):
            d: dict[str, Any] = {"type": "message", "ts": m.ts, "text": m.text}
            if m.metadata and str(p.get("include_all_metadata")).lower() in ("1", "true"):
                d["metadata"] = m.metadata
            out.append(d)
        return {"ok": True, "messages": out, "has_more": False}

    def _api_conversations_replies(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("channel") != self.channel:
            return {"ok": False, "error": "channel_not_found"}
        with self._lock:
            parent = [m for m in self.messages if m.ts == p.get("ts") and m.thread_ts is None]
            if not parent:
                return {"ok": False, "error": "thread_not_found"}
            msgs = parent + [m for m in self.messages if m.thread_ts == p.get("ts")]
        out = []
        for m in msgs:
            d: dict[str, Any] = {"type": "message", "ts": m.ts, "text": m.text, "thread_ts": p.get("ts")}
            if m.metadata and str(p.get("include_all_metadata")).lower() in ("1", "true"):
                d["metadata"] = m.metadata
            out.append(d)
        return {"ok": True, "messages": out, "has_more": False}

    def _api_files_getUploadURLExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("filename") or not p.get("length"):
            return {"ok": False, "error": "invalid_arguments"}
        with self._lock:
            file_id = f"F{len(self.uploads) + 1:08d}"
            self.uploads[file_id] = {"filename": p["filename"], "length": int(p["length"]), "data": None}
        return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}

    def _api_files_completeUploadExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        files = p.get("files")
        if isinstance(files, str):
            files = json.loads(files)
        done = []
        with self._lock:
            for f in files or []:
                up = self.uploads.get(f.get("id"))
                if up is None or up["data"] is None or len(up["data"]) != up["length"]:
                    return {"ok": False, "error": "file_not_found"}
                up.update(title=f.get("title"), channel=p.get("channel_id"), thread_ts=p.get("thread_ts"))
                for m in self.messages:
                    if m.ts == p.get("thread_ts"):
                        m.files.append({"id": f["id"], "title": f.get("title"), "size": len(up["data"])})
                done.append({"id": f["id"], "title": f.get("title")})
        return {"ok": True, "files": done}


def _blocks_ok(blocks: Any) -> bool:
    """The limits Slack enforces (50 blocks, 150-char header, 3000-char section, 10 fields)."""
    if not isinstance(blocks, list) or len(blocks) > 50:
        return False
    for b in blocks:
        if not isinstance(b, dict) or "type" not in b:
            return False
        t = b["type"]
        if t == "header" and len(b.get("text", {}).get("text", "")) > 150:
            return False
        if t == "section":
            if len((b.get("text") or {}).get("text", "")) > 3000 or len(b.get("fields") or []) > 10:
                return False
            if any(len(f.get("text", "")) > 2000 for f in b.get("fields") or []):
                return False
        if t == "actions" and len(b.get("elements") or []) > 25:
            return False
        if t == "context" and len(b.get("elements") or []) > 10:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m rankwatch.sim.slack …`` is ``rankwatch sim slack …``."""
    from rankwatch.cli import main as rankwatch_main

    return rankwatch_main(["sim", "slack", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
