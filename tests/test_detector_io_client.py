"""The detector's Prometheus HTTP client against local servers: error JSON, garbage, retries,
timeouts, bearer/basic auth (secrets never logged), TLS (CA, client certificate, skip-verify)
and AWS SigV4 — the signature is re-derived here from the request the server received."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from rankwatch.detectors.prom_client import PromClient, PromConnection, PromQueryError
from rankwatch.errors import ConfigError

OK_VECTOR = {"status": "success", "data": {"resultType": "vector", "result": [
    {"metric": {"__name__": "up", "instance": "a:1"}, "value": [1700000000, "1"]},
    {"metric": {"__name__": "up", "instance": "b:1"}, "value": [1700000000, "NaN"]}]}}


class _QuietServer(ThreadingHTTPServer):
    """Keeps a client's aborted connection (a refused TLS handshake, a client that gave up) off
    stderr, where it would land in the captured output of the CLI under test."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakePrometheus:
    """A loopback HTTP(S) server answering with ``respond(request) -> (status, body bytes)`` (or
    ``(status, body, {extra headers})``) and recording every request (method, path, headers,
    body)."""

    def __init__(self, respond: Callable[[dict[str, Any]], tuple[int, bytes]],
                 tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                       "body": body, "form": {k: v[0] for k, v in parse_qs(body.decode()).items()}}
                outer.requests.append(req)
                status, payload, *extra = outer.respond(req)
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_prom() -> Iterator[Callable[..., FakePrometheus]]:
    servers: list[FakePrometheus] = []

    def start(respond: Callable[[dict[str, Any]], tuple[int, bytes]], tls: ssl.SSLContext | None = None) -> FakePrometheus:
        s = FakePrometheus(respond, tls)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def ok(_req: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps(OK_VECTOR).encode()


def client(url: str, **kw: Any) -> PromClient:
    kw.setdefault("retries", 0)
    kw.setdefault("timeout_s", 2.0)
    return PromClient(PromConnection(url=url, **kw))


def test_instant_query_parses_vector_and_drops_nan(fake_prom) -> None:
    srv = fake_prom(ok)
    rows = client(srv.url).query("up", 1700000000.0)
    assert rows == [({"__name__": "up", "instance": "a:1"}, 1.0)]
    req = srv.requests[0]
    # POST form: no URL length limit for long expressions
    assert req["method"] == "POST" and req["path"] == "/api/v1/query"
    assert req["form"] == {"query": "up", "time": "1700000000.000"}


def test_range_query_parses_matrix(fake_prom) -> None:
    body = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"rank": "0"}, "values": [[100, "1.5"], [115, "+Inf"], [130, "2"]]}]}}
    srv = fake_prom(lambda r: (200, json.dumps(body).encode()))
    assert client(srv.url).query_range("x", 100, 130, 15) == [({"rank": "0"}, [(100.0, 1.5), (130.0, 2.0)])]
    assert srv.requests[0]["form"] == {"query": "x", "start": "100.000", "end": "130.000", "step": "15"}


@pytest.mark.parametrize("status,payload,expect", [
    (400, {"status": "error", "errorType": "bad_data", "error": "1:5: parse error: unclosed left parenthesis"},
     "HTTP 400 bad_data: 1:5: parse error: unclosed left parenthesis"),
    (422, {"status": "error", "errorType": "execution", "error": "many-to-many matching not allowed"},
     "execution: many-to-many matching not allowed"),
    (200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "1"]}}, "expected a vector"),
    (200, {"status": "success"}, "'data.result' missing"),
    (200, ["not", "an", "object"], "unexpected JSON"),
    (200, {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "x"]}]}},
     "malformed sample"),
])
def test_prometheus_errors_are_clear(fake_prom, status: int, payload: Any, expect: str) -> None:
    srv = fake_prom(lambda r: (status, json.dumps(payload).encode()))
    with pytest.raises(PromQueryError) as exc:
        client(srv.url).query("sum(")
    assert expect in str(exc.value)


def test_garbage_body_is_named(fake_prom) -> None:
    srv = fake_prom(lambda r: (500, b"<html>Internal Server Error</html>"))
    with pytest.raises(PromQueryError, match=r"HTTP 500, response is not JSON: '<html>Internal Server Error"):
        client(srv.url).query("up")


def test_retries_with_backoff_then_succeeds(fake_prom) -> None:
    calls = []

    def flaky(req: dict[str, Any]) -> tuple[int, bytes]:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return 503, json.dumps({"status": "error", "errorType": "unavailable", "error": "busy"}).encode()
        return ok(req)

    srv = fake_prom(flaky)
    rows = client(srv.url, retries=2, backoff_s=0.1).query("up")
    assert len(rows) == 1 and len(srv.requests) == 3
    assert calls[2] - calls[1] >= 0.15  # backoff grows: 0.1 s then 0.2 s


def test_retries_exhausted_reports_the_last_error(fake_prom) -> None:
    srv = fake_prom(lambda r: (503, json.dumps({"status": "error", "errorType": "timeout",
                                                "error": "query timed out in query queue"}).encode()))
    with pytest.raises(PromQueryError, match="timeout: query timed out") as exc:
        client(srv.url, retries=1, backoff_s=0.01).query("up")
    assert exc.value.error_type == "timeout"
    assert len(srv.requests) == 2


def test_a_server_that_never_answers_is_a_timeout_error_naming_the_limit(silent_server) -> None:
    # Without the timeout this query would wait forever: raising at all is the check.
    with pytest.raises(PromQueryError, match=r"timed out after 0\.3s"):
        client(silent_server.url, timeout_s=0.3).query("up")
    assert silent_server.accepted == 1


def test_unreachable_server() -> None:
    from rankwatch.promserver import free_port

    with pytest.raises(PromQueryError, match="retries.*(refused|Failed to establish)"):
        client(f"http://127.0.0.1:{free_port()}", retries=1, backoff_s=0.01).query("up")


def test_bearer_token_from_file_is_sent_and_never_logged(fake_prom, tmp_path: Path, caplog) -> None:
    token = "s3cr3t-token-value"
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    srv = fake_prom(ok)
    caplog.set_level(logging.DEBUG)
    c = client(srv.url, bearer_token_file=str(tf))
    c.query("up")
    assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {token}"
    # rotated tokens are picked up without a restart
    tf.write_text("rotated")
    c.query("up")
    assert srv.requests[1]["headers"]["Authorization"] == "Bearer rotated"
    assert token not in caplog.text and token not in repr(c.session.auth) and token not in repr(c.conn)


def test_bearer_token_from_env(fake_prom, monkeypatch) -> None:
    monkeypatch.setenv("RANKWATCH_PROMETHEUS_TOKEN", "from-env")
    srv = fake_prom(ok)
    client(srv.url, bearer_token_env="RANKWATCH_PROMETHEUS_TOKEN").query("up")
    assert srv.requests[0]["headers"]["Authorization"] == "Bearer from-env"


def test_basic_auth_password_from_env(fake_prom, monkeypatch) -> None:
    monkeypatch.setenv("RANKWATCH_PROMETHEUS_PASSWORD", "pa:ss")

    def check(req: dict[str, Any]) -> tuple[int, bytes]:
        expected = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
        if req["headers"].get("Authorization") != expected:
            return 401, json.dumps({"status": "error", "errorType": "unauthorized", "error": "bad credentials"}).encode()
        return ok(req)

    srv = fake_prom(check)
    assert client(srv.url, basic_user="alice", basic_password_env="RANKWATCH_PROMETHEUS_PASSWORD").query("up")
    monkeypatch.setenv("RANKWATCH_PROMETHEUS_PASSWORD", "wrong")
    with pytest.raises(PromQueryError, match="HTTP 401 unauthorized: bad credentials") as exc:
        client(srv.url, basic_user="alice", basic_password_env="RANKWATCH_PROMETHEUS_PASSWORD").query("up")
    assert "wrong" not in str(exc.value)


def test_extra_headers_are_sent(fake_prom) -> None:
    srv = fake_prom(ok)
    client(srv.url, headers={"X-Scope-OrgID": "team-a"}).query("up")
    assert srv.requests[0]["headers"]["X-Scope-OrgID"] == "team-a"


def test_connection_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        PromConnection(url="prometheus:9090")
    with pytest.raises(ConfigError, match="ca file: no such file"):
        PromConnection(url="https://x", ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="choose one of"):
        PromConnection(url="http://x", basic_user="a", sigv4_region="us-east-1")


# --- AWS SigV4 (Amazon Managed Service for Prometheus) -----------------------------------------

def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def expected_sigv4(req: dict[str, Any], secret: str, region: str, service: str) -> str:
    """The SigV4 signature of the request as received, from the published algorithm."""
    auth = req["headers"]["Authorization"]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {k.lower(): " ".join(v.split()) for k, v in req["headers"].items()}
    canonical = "\n".join([
        req["method"], req["path"].split("?")[0], "",
        "".join(f"{h}:{headers[h]}\n" for h in signed), ";".join(signed),
        hashlib.sha256(req["body"]).hexdigest(),
    ])
    amz_date = headers["x-amz-date"]
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), amz_date[:8]), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_sigv4_signature_matches_the_request_received(fake_prom, monkeypatch, tmp_path: Path) -> None:
    # The default AWS credential chain, fed from the environment only.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-example")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def verify(req: dict[str, Any]) -> tuple[int, bytes]:
        auth = req["headers"].get("Authorization", "")
        sig = auth.rsplit("Signature=", 1)[-1]
        if sig != expected_sigv4(req, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "eu-west-1", "aps"):
            return 403, json.dumps({"status": "error", "errorType": "forbidden", "error": "signature mismatch"}).encode()
        return ok(req)

    srv = fake_prom(verify)
    c = client(srv.url + "/workspaces/ws-123", sigv4_region="eu-west-1")
    assert c.query('sum by (rank) (rate(rankwatch_steps_total{run="a b"}[1m]))', 1700000000)
    req = srv.requests[0]
    assert req["path"] == "/workspaces/ws-123/api/v1/query"
    auth = req["headers"]["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/aps/aws4_request" in auth and "host" in auth.split("SignedHeaders=")[1]
    assert req["headers"]["X-Amz-Security-Token"] == "session-token-example"
    # a tampered request would not verify: the check above is not vacuous
    tampered = dict(req, body=req["body"] + b"x")
    assert auth.rsplit("Signature=", 1)[-1] != expected_sigv4(tampered, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                                                 "eu-west-1", "aps")


def test_sigv4_without_credentials_is_a_clear_error(fake_prom, monkeypatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    srv = fake_prom(ok)
    with pytest.raises(PromQueryError, match="no AWS credentials"):
        client(srv.url, sigv4_region="us-east-1").query("up")
    assert srv.requests == []


# --- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # EC: key generation in milliseconds
    run("req", "-x509", *ec, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=rankwatch test CA")
    for name in ("server", "client"):
        run("req", *ec, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _server_tls(pki: dict[str, Path], require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca.pem"])
    return ctx


def test_tls_ca_file_and_skip_verify(fake_prom, pki) -> None:
    srv = fake_prom(ok, tls=_server_tls(pki, require_client=False))
    assert client(srv.url, ca_file=str(pki["ca.pem"])).query("up")
    with pytest.raises(PromQueryError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        client(srv.url).query("up")
    assert client(srv.url, insecure_skip_verify=True).query("up")


def test_tls_client_certificate(fake_prom, pki) -> None:
    srv = fake_prom(ok, tls=_server_tls(pki, require_client=True))
    with pytest.raises(PromQueryError):
        client(srv.url, ca_file=str(pki["ca.pem"])).query("up")
    assert client(srv.url, ca_file=str(pki["ca.pem"]), client_cert=str(pki["client.pem"]),
                  client_key=str(pki["client.key"])).query("up")


def test_gzip_is_asked_for_only_from_remote_servers(fake_prom) -> None:
    from rankwatch.detectors.prom_client import is_loopback

    assert is_loopback("http://127.0.0.1:9090") and is_loopback("http://localhost:9090/prom")
    assert is_loopback("https://[::1]:9090") and is_loopback("http://127.3.2.1")
    assert not is_loopback("http://prometheus:9090") and not is_loopback("https://10.0.0.5:9090")
    srv = fake_prom(ok)
    client(srv.url).query("up")  # loopback: compressing would only cost the server CPU
    client(srv.url, compress=True).query("up")
    assert [r["headers"].get("Accept-Encoding") for r in srv.requests] == ["identity", "gzip"]
    # what a remote server would be asked for (a session header; no request needed)
    assert client("http://prometheus.example:9090").session.headers["Accept-Encoding"] == "gzip"
    assert client("http://prometheus.example:9090", compress=False).session.headers["Accept-Encoding"] == "identity"


# --- hardening (issues 11 and 15) ----------------------------------------------------------------

def redirecting(status: int, location: Callable[[dict[str, Any]], str]
                ) -> Callable[[dict[str, Any]], tuple[int, bytes, dict[str, str]]]:
    return lambda req: (status, b"{}", {"Location": location(req)})


@pytest.mark.parametrize("status", [307, 302])
def test_redirect_from_https_to_plain_http_is_refused_and_logged_once(fake_prom, pki, caplog, status: int) -> None:
    plain = fake_prom(ok)
    tls = fake_prom(redirecting(status, lambda req: plain.url + "/api/v1/query"),
                    tls=_server_tls(pki, require_client=False))
    c = client(tls.url, ca_file=str(pki["ca.pem"]), headers={"X-Scope-OrgID": "tenant-secret-1"})
    caplog.set_level(logging.INFO)
    for _ in range(3):
        with pytest.raises(PromQueryError, match=f"HTTP {status} redirect from HTTPS to plain HTTP") as exc:
            c.query("up")
        assert exc.value.error_type == "redirect"
    # nothing went out in clear text, and the refusal was said once, with the way out
    assert plain.requests == [] and len(tls.requests) == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "--allow-redirects" in warnings[0].getMessage()
    assert "tenant-secret-1" not in caplog.text


def test_redirect_to_another_host_is_refused_unless_allowed_and_then_without_credentials(
        fake_prom, tmp_path: Path) -> None:
    target = fake_prom(ok)
    other_host = target.url.replace("127.0.0.1", "localhost")  # same server, another host name
    hop = fake_prom(redirecting(307, lambda req: other_host + "/api/v1/query"))
    token = tmp_path / "token"
    token.write_text("tok-123456\n")
    with pytest.raises(PromQueryError, match="redirect to another host"):
        client(hop.url, bearer_token_file=str(token)).query("up")
    assert target.requests == []
    # asked for: followed, the form re-sent, the extra headers kept, the token not
    rows = client(hop.url, bearer_token_file=str(token), allow_redirects=True,
                  headers={"X-Scope-OrgID": "team-a"}).query("up", 1700000000.0)
    assert rows == [({"__name__": "up", "instance": "a:1"}, 1.0)]
    (req,) = target.requests
    assert req["form"] == {"query": "up", "time": "1700000000.000"} and req["headers"]["X-Scope-OrgID"] == "team-a"
    assert "Authorization" not in req["headers"]
    assert hop.requests[-1]["headers"]["Authorization"] == "Bearer tok-123456"


def test_redirect_on_the_same_https_host_is_followed(fake_prom, pki) -> None:
    def answer(req: dict[str, Any]) -> tuple[Any, ...]:
        return (308, b"{}", {"Location": "/prom" + req["path"]}) if not req["path"].startswith("/prom/") else ok(req)

    srv = fake_prom(answer, tls=_server_tls(pki, require_client=False))
    assert client(srv.url, ca_file=str(pki["ca.pem"])).query("up")
    assert [r["path"] for r in srv.requests] == ["/api/v1/query", "/prom/api/v1/query"]
    assert srv.requests[1]["method"] == "POST" and srv.requests[1]["form"] == {"query": "up"}


def test_insecure_skip_verify_warns_once_and_contradicting_ca_file_is_refused(fake_prom, pki, caplog,
                                                                               capsys) -> None:
    srv = fake_prom(ok, tls=_server_tls(pki, require_client=False))
    caplog.set_level(logging.INFO)
    c = client(srv.url, insecure_skip_verify=True)
    c.query("up")
    c.query("up")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "verification is OFF" in warnings[0]
    with pytest.raises(ConfigError, match="--ca-file and --insecure-skip-verify"):
        PromConnection(url=srv.url, ca_file=str(pki["ca.pem"]), insecure_skip_verify=True)
    from rankwatch.cli import main

    assert main(["detect", "--prometheus", srv.url, "--start", "1", "--end", "100", "--ca-file",
                 str(pki["ca.pem"]), "--insecure-skip-verify"]) == 2
    err = capsys.readouterr().err
    assert "--ca-file and --insecure-skip-verify" in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["s3cr3t-first-line\nsecond-line\n", "s3cr3t-first-line\x07\n",
                                     "\n\ns3cr3t-first-line\n"])
def test_token_file_that_is_not_one_printable_line_is_refused_without_showing_it(
        fake_prom, tmp_path: Path, content: str) -> None:
    tf = tmp_path / "token"
    tf.write_text(content)
    with pytest.raises(ConfigError) as exc:
        PromConnection(url="http://127.0.0.1:1", bearer_token_file=str(tf))
    assert str(tf) in str(exc.value) and "s3cr3t" not in str(exc.value) and "second" not in str(exc.value)


def test_token_file_rotated_to_garbage_fails_the_query_cleanly(fake_prom, tmp_path: Path, caplog) -> None:
    """A token file rewritten while running (here: two lines) fails each query with a clear auth
    error; the token never shows, in the error or in the log."""
    tf = tmp_path / "token"
    tf.write_text("s3cr3t-token-value\n")
    srv = fake_prom(ok)
    c = client(srv.url, bearer_token_file=str(tf))
    c.query("up")
    tf.write_text("s3cr3t-token-value\nsecond-line\n")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PromQueryError) as exc:
        c.query("up")
    assert exc.value.error_type == "auth" and str(tf) in str(exc.value)
    assert "s3cr3t" not in str(exc.value) and "s3cr3t" not in caplog.text and len(srv.requests) == 1


def test_error_texts_are_redacted_of_tokens_and_header_values(fake_prom, tmp_path: Path) -> None:
    """A proxy that echoes the request headers in its error page: the message keeps the page, not
    the secrets."""
    tf = tmp_path / "token"
    tf.write_text("tok-abcdef-123\n")
    srv = fake_prom(lambda req: (502, f"<html>bad gateway for {req['headers']}</html>".encode()))
    with pytest.raises(PromQueryError) as exc:
        client(srv.url, bearer_token_file=str(tf), headers={"X-Api-Key": "key-9876543"}).query("up")
    msg = str(exc.value)
    assert "bad gateway" in msg and "***" in msg
    assert "tok-abcdef-123" not in msg and "key-9876543" not in msg


def test_connection_errors_are_retried_and_timeouts_are_not(fake_prom) -> None:
    """Retry what a second try can fix (refused, 503), never a timeout: the server counts it."""
    release = threading.Event()
    srv = fake_prom(lambda r: (release.wait(30), ok(r))[1])
    try:
        with pytest.raises(PromQueryError, match="timed out") as exc:
            client(srv.url, timeout_s=0.3, retries=2, backoff_s=0.01).query("up")
        assert exc.value.error_type == "timeout" and len(srv.requests) == 1
    finally:
        release.set()


def test_a_deadline_bounds_tries_and_waits_together(fake_prom) -> None:
    """A 503 with a Retry-After beyond the deadline is not waited for: one request, the server's
    own error."""
    srv = fake_prom(lambda r: (503, json.dumps({"status": "error", "errorType": "unavailable",
                                                "error": "overloaded"}).encode()))
    with pytest.raises(PromQueryError, match="unavailable: overloaded"):
        client(srv.url, retries=3, backoff_s=10.0).query("up", deadline=time.monotonic() + 2.0)
    assert len(srv.requests) == 1
    with pytest.raises(PromQueryError, match="budget is spent"):
        client(srv.url).query("up", deadline=time.monotonic() - 1)
    assert len(srv.requests) == 1  # a spent budget sends nothing


def test_replay_range_values_are_converted_once_and_a_malformed_one_fails_only_its_query(fake_prom) -> None:
    # The replay's range path hands the JSON's values to the joins unconverted (one pass per
    # point). What query_range guarantees must still hold there: NaN/±Inf points are no data,
    # never a value; a malformed point fails its own query (named in Snapshot.errors, its
    # quantities missing) while the other queries still count; no traceback.
    from rankwatch.detectors.source import PromSource

    t0 = 1_700_000_010.0
    rank = {"run": "r", "rank": "0", "node": "n1", "instance": "n1:9420", "job": "probe"}

    def matrix(values: list) -> bytes:
        return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": dict(rank), "values": values}] if values else []}}).encode()

    def respond(req: dict[str, Any]) -> tuple[int, bytes]:
        q = req["form"]["query"]
        if q.startswith("last_over_time(rankwatch_rank_info"):
            return 200, matrix([[t0, "1"], [t0 + 15, "1"], [t0 + 30, "1"]])
        if "rankwatch_steps_total" in q:
            return 200, matrix([[t0, "2"], [t0 + 15, "NaN"], [t0 + 30, "+Inf"]])
        if "rankwatch_step_seconds_total" in q:
            return 200, matrix([[t0, "1"], [t0 + 15, "x"]])  # malformed
        if "rankwatch_tokens_total" in q:
            return 200, matrix([[t0, "8192"], [t0 + 30, "-Inf"]])
        return 200, matrix([])

    srv = fake_prom(respond)
    src = PromSource(client(srv.url), 15.0, ["rx_drops"])
    try:
        snaps = list(src.snapshots(t0, t0 + 30, 15.0))
    finally:
        src.close()
    assert [s.time for s in snaps] == [t0, t0 + 15, t0 + 30]
    assert [[r.rank for r in s.ranks] for s in snaps] == [[0], [0], [0]]
    assert [s.ranks[0].steps_rate for s in snaps] == [2.0, None, None]
    assert [s.ranks[0].tokens_rate for s in snaps] == [8192.0, None, None]
    # the malformed query's quantity is missing at every time, and said
    assert [s.ranks[0].step_seconds for s in snaps] == [None, None, None]
    for s in snaps:
        assert [e for e in s.errors if "malformed" in e] == \
            ["rank_step_seconds_rate: range query: malformed sample: ValueError(\"could not convert string to "
             "float: 'x'\")"]


@pytest.mark.parametrize("result", [[{"metric": {}}], [{"metric": [], "values": []}], [{"metric": {}, "values": 3}]],
                         ids=["no-values", "metric-not-object", "values-not-list"])
def test_range_query_raw_names_a_malformed_series(fake_prom, result: list) -> None:
    body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
    srv = fake_prom(lambda r: (200, json.dumps(body).encode()))
    with pytest.raises(PromQueryError, match="range query: malformed"):
        client(srv.url).query_range_raw("x", 100, 130, 15)
