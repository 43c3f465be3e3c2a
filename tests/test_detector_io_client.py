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


class FakePrometheus:
    """A loopback HTTP(S) server answering with ``respond(request) -> (status, body bytes)`` and
    recording every request (method, path, headers, body)."""

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
                status, payload = outer.respond(req)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
    with pytest.raises(PromQueryError, match=r"timed out after 0.3s \(0 retries\)"):
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
