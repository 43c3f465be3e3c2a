"""A thin client for the Prometheus HTTP query API (`/api/v1/query`, `/api/v1/query_range`).

It works unchanged against anything that speaks the API — Prometheus, VictoriaMetrics, Thanos,
Mimir, Amazon Managed Service for Prometheus — so everything server-specific is a connection
option: bearer token or basic auth, TLS files, extra headers (Mimir's ``X-Scope-OrgID``) and AWS
SigV4 signing (service ``aps``) with credentials from botocore's default chain.

Secrets come from the environment or files and never appear in logs, reprs or error messages."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from rankwatch.errors import ConfigError, RankwatchError

# Environment variables read when no token/password is given on the command line.
ENV_BEARER_TOKEN = "RANKWATCH_PROMETHEUS_TOKEN"
ENV_BASIC_PASSWORD = "RANKWATCH_PROMETHEUS_PASSWORD"

# Statuses worth retrying: overload and gateway errors. A 503 "query timed out" is retried
# too — it is cheap to give up after ``retries`` tries and the cycle budget stays bounded.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class PromQueryError(RankwatchError):
    """A query failed: transport error, HTTP error, error JSON from the server, or garbage."""

    def __init__(self, message: str, *, error_type: str = "transport") -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class PromConnection:
    """How to reach a Prometheus-compatible query API. Secrets are read lazily from files or the
    environment at request time (tokens rotate), never stored in a repr."""

    url: str
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.2
    bearer_token_file: str | None = None
    bearer_token_env: str | None = None  # name of an environment variable holding the token
    basic_user: str | None = None
    basic_password_file: str | None = None
    basic_password_env: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure_skip_verify: bool = False
    sigv4_region: str | None = None
    sigv4_service: str = "aps"
    sigv4_profile: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # gzip responses: None = only when the server is not on this host. Compressing a large
    # result costs Prometheus more CPU than sending it over loopback (BENCHMARKS.md).
    compress: bool | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"prometheus url: must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"prometheus timeout: must be positive, got {self.timeout_s!r}")
        if self.retries < 0:
            raise ConfigError(f"prometheus retries: must be >= 0, got {self.retries!r}")
        auths = [bool(self.bearer_token_file or self.bearer_token_env), bool(self.basic_user),
                 bool(self.sigv4_region)]
        if sum(auths) > 1:
            raise ConfigError("prometheus auth: choose one of bearer token, basic auth or SigV4")
        if self.client_key and not self.client_cert:
            raise ConfigError("prometheus client key: given without a client certificate")
        for name in ("bearer_token_file", "basic_password_file", "ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"prometheus {name.replace('_', ' ')}: no such file {path!r}")


def _read_secret(path: str | None, env: str | None, what: str) -> str:
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PromQueryError(f"cannot read {what} file {path}: {exc.strerror or exc}",
                                 error_type="auth") from None
    else:
        value = os.environ.get(env or "", "")
    if not value:
        where = f"file {path}" if path else f"environment variable {env}"
        raise PromQueryError(f"{what} is empty ({where})", error_type="auth")
    return value


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token_file: str | None, token_env: str | None) -> None:
        self._file, self._env = token_file, token_env

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = "Bearer " + _read_secret(self._file, self._env, "bearer token")
        return r

    def __repr__(self) -> str:
        return "<bearer auth>"


class _BasicAuth(requests.auth.AuthBase):
    def __init__(self, user: str, password_file: str | None, password_env: str | None) -> None:
        self._user, self._file, self._env = user, password_file, password_env

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        password = _read_secret(self._file, self._env, "basic-auth password")
        return requests.auth.HTTPBasicAuth(self._user, password)(r)

    def __repr__(self) -> str:
        return f"<basic auth user={self._user!r}>"


class SigV4RequestAuth(requests.auth.AuthBase):
    """Signs each prepared request with AWS Signature Version 4 (botocore), as Amazon Managed
    Service for Prometheus requires. Credentials come from botocore's default chain
    (environment, shared config/profile, web identity, container and instance metadata) and are
    re-read per request so that temporary credentials refresh."""

    def __init__(self, region: str, service: str = "aps", profile: str | None = None,
                 credentials: Any | None = None) -> None:
        self.region, self.service = region, service
        self._profile = profile
        self._credentials = credentials  # tests pass botocore Credentials; None = default chain

    def _current_credentials(self) -> Any:
        if self._credentials is None:
            import botocore.session

            session = botocore.session.Session(profile=self._profile)
            creds = session.get_credentials()
            if creds is None:
                raise PromQueryError("SigV4: no AWS credentials found in the default chain "
                                     "(environment, ~/.aws, web identity, instance metadata)",
                                     error_type="auth")
            self._credentials = creds
        return self._credentials.get_frozen_credentials()

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        body = r.body.encode() if isinstance(r.body, str) else (r.body or b"")
        headers = {"Content-Type": r.headers["Content-Type"]} if "Content-Type" in r.headers else {}
        aws_req = AWSRequest(method=r.method, url=r.url, data=body, headers=headers)
        SigV4Auth(self._current_credentials(), self.service, self.region).add_auth(aws_req)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256"):
            if name in aws_req.headers:
                r.headers[name] = aws_req.headers[name]
        return r

    def __repr__(self) -> str:
        return f"<sigv4 auth service={self.service} region={self.region}>"


def _float(v: Any) -> float:
    # Values are strings because of NaN/±Inf; a garbage value must raise, not pass silently.
    return float(v)


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this host (localhost or a loopback address)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PromClient:
    """Instant and range queries with timeouts, retries with backoff and clear errors."""

    # The JSON decoder; orjson decodes Prometheus' responses about twice as fast as the standard
    # library (an attribute so that the benchmarks can time the old path beside the new).
    loads: Callable[[bytes], Any] = staticmethod(orjson.loads)

    def __init__(self, conn: PromConnection, *, pool_size: int = 16) -> None:
        self.conn = conn
        self.base = conn.url.rstrip("/")
        self._where = re.sub(r"//[^/@]*@", "//", self.base)  # never echo credentials in a URL
        s = requests.Session()
        retry = Retry(
            total=conn.retries, connect=conn.retries, read=conn.retries, status=conn.retries,
            backoff_factor=conn.backoff_s, status_forcelist=sorted(RETRY_STATUSES),
            # Queries are read-only: POST (form-encoded, no URL length limit) is safe to retry.
            allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
            respect_retry_after_header=True, backoff_max=5.0,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        compress = conn.compress if conn.compress is not None else not is_loopback(self.base)
        s.headers.update({"User-Agent": "rankwatch-detector", "Accept-Encoding": "gzip" if compress else "identity",
                          **dict(conn.headers)})
        # The environment (proxies, CA bundle) is read once here, not per request: requests'
        # per-request scan of os.environ cost more than the query itself in a live cycle.
        s.trust_env = False
        s.proxies = {k: v for k, v in requests.utils.get_environ_proxies(self.base).items() if v}
        env_ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self._verify: bool | str = False if conn.insecure_skip_verify else (conn.ca_file or env_ca or True)
        self._cert: Any = None
        if conn.client_cert:
            self._cert = (conn.client_cert, conn.client_key) if conn.client_key else conn.client_cert
        if conn.bearer_token_file or conn.bearer_token_env:
            s.auth = _BearerAuth(conn.bearer_token_file, conn.bearer_token_env)
        elif conn.basic_user:
            s.auth = _BasicAuth(conn.basic_user, conn.basic_password_file, conn.basic_password_env)
        elif conn.sigv4_region:
            s.auth = SigV4RequestAuth(conn.sigv4_region, conn.sigv4_service, conn.sigv4_profile)
        self.session = s
        if conn.insecure_skip_verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        self.session.close()

    def _post(self, path: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        url = self.base + path
        try:
            r = self.session.post(url, data=params, timeout=self.conn.timeout_s, verify=self._verify, cert=self._cert)
        except requests.exceptions.Timeout as exc:
            raise PromQueryError(f"{what}: timed out after {self.conn.timeout_s:g}s ({self.conn.retries} retries): "
                                 f"{_reason(exc)}", error_type="timeout") from None
        except requests.exceptions.SSLError as exc:
            raise PromQueryError(f"{what}: TLS error with {self._where}: {_reason(exc)}", error_type="tls") from None
        except requests.ConnectionError as exc:
            # with retries, urllib3 reports an exhausted read timeout as a connection error
            if "timed out" in str(exc).lower():
                raise PromQueryError(f"{what}: timed out after {self.conn.timeout_s:g}s ({self.conn.retries} "
                                     f"retries): {_reason(exc)}", error_type="timeout") from None
            raise PromQueryError(f"{what}: cannot connect to {self._where} ({self.conn.retries} retries): "
                                 f"{_reason(exc)}", error_type="connection") from None
        except requests.RequestException as exc:
            raise PromQueryError(f"{what}: {type(exc).__name__}: {_reason(exc)}") from None
        try:
            body = self.loads(r.content)
        except ValueError:
            snippet = r.text[:200].replace("\n", " ")
            raise PromQueryError(f"{what}: HTTP {r.status_code}, response is not JSON: {snippet!r}",
                                 error_type="bad_response") from None
        if not isinstance(body, dict) or "status" not in body:
            raise PromQueryError(f"{what}: HTTP {r.status_code}, unexpected JSON (no 'status')",
                                 error_type="bad_response")
        if body["status"] != "success":
            et = str(body.get("errorType") or f"http_{r.status_code}")
            raise PromQueryError(f"{what}: HTTP {r.status_code} {et}: {body.get('error')}", error_type=et)
        data = body.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise PromQueryError(f"{what}: 'data.result' missing or not a list", error_type="bad_response")
        return data

    def query(self, expr: str, time_s: float | None = None) -> list[tuple[dict[str, str], float]]:
        """Instant query → [(labels, value)], NaN/Inf values dropped (they mean "no data")."""
        params: dict[str, Any] = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data = self._post("/api/v1/query", params, "query")
        if data.get("resultType") != "vector":
            raise PromQueryError(f"query: expected a vector, got {data.get('resultType')!r}",
                                 error_type="bad_response")
        out: list[tuple[dict[str, str], float]] = []
        try:
            for item in data["result"]:
                v = _float(item["value"][1])
                if math.isfinite(v):
                    out.append((item["metric"], v))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PromQueryError(f"query: malformed sample: {exc!r}", error_type="bad_response") from None
        return out

    def query_range(self, expr: str, start: float, end: float, step: float
                    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Range query → [(labels, [(t, value), ...])], NaN/Inf points dropped."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = self._post("/api/v1/query_range", params, "range query")
        if data.get("resultType") != "matrix":
            raise PromQueryError(f"range query: expected a matrix, got {data.get('resultType')!r}",
                                 error_type="bad_response")
        out: list[tuple[dict[str, str], list[tuple[float, float]]]] = []
        isfinite = math.isfinite
        try:
            for item in data["result"]:
                # one pass, one tuple per kept point: a replay decodes ~10^5-10^6 points
                out.append((item["metric"], [(float(t), x) for t, v in item["values"] if isfinite(x := float(v))]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PromQueryError(f"range query: malformed sample: {exc!r}",
                                 error_type="bad_response") from None
        return out


def _reason(exc: BaseException) -> str:
    # urllib3 wraps the root cause several levels deep (MaxRetryError -> NewConnectionError ->
    # OSError); show the innermost message, without the pool's repr.
    inner: BaseException = exc
    for _ in range(8):
        nxt = getattr(inner, "reason", None)
        if nxt is None and inner.args and isinstance(inner.args[0], BaseException):
            nxt = inner.args[0]
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    text = str(inner)
    m = re.search(r"(\[Errno -?\d+\][^'\")]*)", text)
    return (m.group(1) if m else text)[:300]
