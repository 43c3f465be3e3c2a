"""A thin client for the Prometheus HTTP query API (`/api/v1/query`, `/api/v1/query_range`).

It works unchanged against anything that speaks the API — Prometheus, VictoriaMetrics, Thanos,
Mimir, Amazon Managed Service for Prometheus — so everything server-specific is a connection
option: bearer token or basic auth, TLS files, extra headers (Mimir's ``X-Scope-OrgID``) and AWS
SigV4 signing (service ``aps``) with credentials from botocore's default chain.

Secrets come from the environment or files (one line of printable characters, checked by
``rankwatch.secrets``) and never appear in logs, reprs or error messages: every error text is
redacted of the token, password and extra header values before it leaves this module.

Transport policy, so that a dead or hostile server costs little and learns nothing:
- a timeout is never retried, and a live cycle passes one deadline shared by all its queries, so
  a server that never answers costs one timeout per cycle;
- connection errors (refused, reset) and HTTP 429/502/503/504 are retried with exponential
  backoff, within that deadline;
- redirects are followed by hand: never one that leaves HTTPS or goes to another host unless
  ``allow_redirects`` is set (and then without the credentials, as requests does); the refusal
  is logged once."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter

from rankwatch.errors import ConfigError, RankwatchError
from rankwatch.secrets import check_secret, read_secret_file

log = logging.getLogger(__name__)

# Environment variables read when no token/password is given on the command line.
ENV_BEARER_TOKEN = "RANKWATCH_PROMETHEUS_TOKEN"
ENV_BASIC_PASSWORD = "RANKWATCH_PROMETHEUS_PASSWORD"

# Statuses worth retrying: overload and gateway errors. A 503 "query timed out" is retried
# too — it is cheap to give up after ``retries`` tries and the cycle budget stays bounded.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
BACKOFF_MAX_S = 5.0
# A Retry-After longer than this is not waited for (the query fails; the next cycle asks again).
RETRY_AFTER_MAX_S = 30.0


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
    # Follow redirects that leave HTTPS or go to another host (never with the credentials).
    allow_redirects: bool = False
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
        if self.ca_file and self.insecure_skip_verify:
            raise ConfigError("prometheus TLS: --ca-file and --insecure-skip-verify contradict each other (the CA "
                              "file would be ignored): give one of them")
        if not (isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s)):
            raise ConfigError(f"prometheus timeout: must be a finite number of seconds, got {self.timeout_s!r}")
        for name in ("bearer_token_file", "basic_password_file", "ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"prometheus {name.replace('_', ' ')}: no such file {path!r}")
        # Checked once at start-up for a clear error; re-read per request (tokens rotate).
        if self.bearer_token_file:
            read_secret_file(self.bearer_token_file, "bearer token")
        if self.basic_password_file:
            read_secret_file(self.basic_password_file, "basic-auth password")


def _read_secret(path: str | None, env: str | None, what: str) -> str:
    try:
        if path:
            return read_secret_file(path, what)
        return check_secret(os.environ.get(env or "", ""), f"environment variable {env}", what)
    except ConfigError as exc:
        raise PromQueryError(str(exc), error_type="auth") from None


class _SecretAuth(requests.auth.AuthBase):
    """Remembers the secrets it sent, so that error texts can be redacted of them."""

    seen: frozenset[str] = frozenset()

    def _remember(self, value: str) -> str:
        if value not in self.seen:
            self.seen = self.seen | {value}
        return value


class _BearerAuth(_SecretAuth):
    def __init__(self, token_file: str | None, token_env: str | None) -> None:
        self._file, self._env = token_file, token_env

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = "Bearer " + self._remember(_read_secret(self._file, self._env, "bearer token"))
        return r

    def __repr__(self) -> str:
        return "<bearer auth>"


class _BasicAuth(_SecretAuth):
    def __init__(self, user: str, password_file: str | None, password_env: str | None) -> None:
        self._user, self._file, self._env = user, password_file, password_env

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        password = self._remember(_read_secret(self._file, self._env, "basic-auth password"))
        r = requests.auth.HTTPBasicAuth(self._user, password)(r)
        self._remember(r.headers["Authorization"].split(" ", 1)[-1])  # the base64 form too
        return r

    def __repr__(self) -> str:
        return f"<basic auth user={self._user!r}>"


class _NoAuth(requests.auth.AuthBase):
    """Sends no credentials (a redirect to another host, followed on request)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.pop("Authorization", None)
        return r


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
        # No retries inside urllib3: ``_post`` retries itself, within the cycle's deadline, never
        # after a timeout, and without urllib3's WARNING line per retry.
        adapter = HTTPAdapter(max_retries=0, pool_connections=pool_size, pool_maxsize=pool_size)
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
        self._lock = threading.Lock()
        self._redirect_warned = False
        if conn.insecure_skip_verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("TLS certificate verification is OFF for %s (--insecure-skip-verify): anyone on the path "
                        "can read and alter the queries and their answers", self._where)

    def close(self) -> None:
        self.session.close()

    # --- secrets never leave in an error text -------------------------------------------------

    def _secrets(self) -> Iterable[str]:
        auth = self.session.auth
        yield from getattr(auth, "seen", ())
        yield from (v for v in self.conn.headers.values() if len(v) >= 4)

    def redact(self, text: str) -> str:
        """``text`` with every secret this client sent (token, password, extra header values)
        replaced by ``***``."""
        for secret in sorted(self._secrets(), key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _error(self, message: str, error_type: str = "transport") -> PromQueryError:
        return PromQueryError(self.redact(message), error_type=error_type)

    # --- one request: retries, deadline, redirects ----------------------------------------------

    def _send(self, url: str, params: dict[str, Any], timeout: float, what: str) -> requests.Response:
        """POST, following redirects by hand: only within HTTPS (or up to it) and the same host,
        unless ``allow_redirects``. Every hop re-sends the form (queries are read-only)."""
        auth: Any = None
        r = self.session.post(url, data=params, timeout=timeout, verify=self._verify, cert=self._cert,
                              allow_redirects=False)
        for _ in range(MAX_REDIRECTS):
            if r.status_code not in REDIRECT_STATUSES or "location" not in r.headers:
                return r
            target = urljoin(r.url, r.headers["location"])
            old, new = urlsplit(r.url), urlsplit(target)
            why = None
            if new.scheme not in ("http", "https"):
                why = f"to a {new.scheme or 'relative'} URL"
            elif old.scheme == "https" and new.scheme != "https":
                why = "from HTTPS to plain HTTP"
            elif (old.hostname or "").lower() != (new.hostname or "").lower():
                why = "to another host"
            shown = re.sub(r"//[^/@]*@", "//", target.split("?", 1)[0])
            if why and (not self.conn.allow_redirects or new.scheme not in ("http", "https")):
                r.close()
                with self._lock:
                    first, self._redirect_warned = not self._redirect_warned, True
                if first:
                    log.warning("%s answered HTTP %d redirecting %s (%s): not followed, the queries and headers "
                                "would leave the connection you configured; point --prometheus at the new "
                                "address, or pass --allow-redirects", self._where, r.status_code, why, shown)
                raise self._error(f"{what}: HTTP {r.status_code} redirect {why} ({shown}) refused",
                                  error_type="redirect")
            if (old.hostname or "").lower() != (new.hostname or "").lower():
                auth = _NoAuth()  # credentials stay with the host they were meant for
            r.close()
            r = self.session.post(target, data=params, timeout=timeout, verify=self._verify, cert=self._cert,
                                  allow_redirects=False, auth=auth)
        if r.status_code in REDIRECT_STATUSES and "location" in r.headers:
            r.close()
            raise self._error(f"{what}: more than {MAX_REDIRECTS} redirects", error_type="redirect")
        return r

    def _post(self, path: str, params: dict[str, Any], what: str, deadline: float | None = None) -> dict[str, Any]:
        """One API call. ``deadline`` (``time.monotonic()``) bounds every try and wait together."""
        url = self.base + path
        for attempt in range(self.conn.retries + 1):
            timeout = self.conn.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise self._error(f"{what}: not sent, the cycle's {self.conn.timeout_s:g}s budget is spent",
                                      error_type="timeout")
            last = attempt >= self.conn.retries
            try:
                r = self._send(url, params, timeout, what)
            except PromQueryError:
                raise
            except requests.exceptions.Timeout as exc:
                # never retried: a server that did not answer in time will not answer a second try
                raise self._error(f"{what}: timed out after {timeout:g}s (not retried): {_reason(exc)}",
                                  error_type="timeout") from None
            except requests.exceptions.SSLError as exc:
                raise self._error(f"{what}: TLS error with {self._where}: {_reason(exc)}", error_type="tls") from None
            except requests.ConnectionError as exc:
                wait = self._backoff(attempt)
                if last or not _can_wait(deadline, wait):
                    raise self._error(f"{what}: cannot connect to {self._where} ({attempt} retries): "
                                      f"{_reason(exc)}", error_type="connection") from None
            except requests.RequestException as exc:
                raise self._error(f"{what}: {type(exc).__name__}: {_reason(exc)}") from None
            except (ValueError, TypeError, OSError) as exc:
                # e.g. http.client refusing a header value: its text may hold the value
                raise self._error(f"{what}: request failed: {type(exc).__name__}: {exc}") from None
            else:
                if r.status_code not in RETRY_STATUSES or last:
                    return self._decode(r, what)
                retry_after = _retry_after(r.headers.get("Retry-After"), self._backoff(attempt))
                if retry_after is None or not _can_wait(deadline, retry_after):
                    return self._decode(r, what)  # the server's own error, not retried
                wait = retry_after
            log.debug("%s: retry %d in %.2fs", what, attempt + 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _backoff(self, attempt: int) -> float:
        return min(BACKOFF_MAX_S, self.conn.backoff_s * (2 ** attempt))

    def _decode(self, r: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = self.loads(r.content)
        except ValueError:
            snippet = r.text[:200].replace("\n", " ")
            raise self._error(f"{what}: HTTP {r.status_code}, response is not JSON: {snippet!r}",
                              error_type="bad_response") from None
        if not isinstance(body, dict) or "status" not in body:
            raise self._error(f"{what}: HTTP {r.status_code}, unexpected JSON (no 'status')",
                              error_type="bad_response")
        if body["status"] != "success":
            et = str(body.get("errorType") or f"http_{r.status_code}")
            raise self._error(f"{what}: HTTP {r.status_code} {et}: {body.get('error')}", error_type=et)
        data = body.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise self._error(f"{what}: 'data.result' missing or not a list", error_type="bad_response")
        return data

    def query(self, expr: str, time_s: float | None = None, *, deadline: float | None = None
              ) -> list[tuple[dict[str, str], float]]:
        """Instant query → [(labels, value)], NaN/Inf values dropped (they mean "no data").
        ``deadline`` (``time.monotonic()``): the cycle's budget, shared with its other queries."""
        params: dict[str, Any] = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data = self._post("/api/v1/query", params, "query", deadline)
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
        rows = self.query_range_raw(expr, start, end, step)
        isfinite = math.isfinite
        try:
            # one pass, one tuple per kept point
            return [(labels, [(float(t), x) for t, v in values if isfinite(x := float(v))]) for labels, values in rows]
        except (IndexError, TypeError, ValueError) as exc:
            raise PromQueryError(f"range query: malformed sample: {exc!r}", error_type="bad_response") from None

    def query_range_raw(self, expr: str, start: float, end: float, step: float
                        ) -> list[tuple[dict[str, str], list[Any]]]:
        """Range query → [(labels, values)] with ``values`` as the JSON has them, ``[t, "v"]``
        pairs, NaN/Inf included: for a consumer that converts each point once, in its own pass
        (the replay's joins: ~2 * 10^5 points per 30 minutes of a 64-rank job)."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = self._post("/api/v1/query_range", params, "range query")
        if data.get("resultType") != "matrix":
            raise PromQueryError(f"range query: expected a matrix, got {data.get('resultType')!r}",
                                 error_type="bad_response")
        try:
            out = [(item["metric"], item["values"]) for item in data["result"]]
        except (KeyError, IndexError, TypeError) as exc:
            raise PromQueryError(f"range query: malformed sample: {exc!r}", error_type="bad_response") from None
        if not all(isinstance(m, dict) and isinstance(v, list) for m, v in out):
            raise PromQueryError("range query: malformed series (metric not an object or values not a list)",
                                 error_type="bad_response")
        return out


def _can_wait(deadline: float | None, seconds: float) -> bool:
    return deadline is None or time.monotonic() + seconds < deadline


def _retry_after(header: str | None, default: float) -> float | None:
    """Seconds to wait before retrying: the server's Retry-After (seconds or an HTTP date), else
    ``default``; None when it asks for more than RETRY_AFTER_MAX_S."""
    if not header:
        return default
    try:
        wait = float(header)
    except ValueError:
        try:
            wait = parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return default
    if not math.isfinite(wait):
        return None
    wait = max(0.0, wait)
    return wait if wait <= RETRY_AFTER_MAX_S else None


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
