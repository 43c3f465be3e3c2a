"""A local stand-in for the Amazon Managed Service for Prometheus REST API (the part that
`rankwatch deploy amp` calls), speaking AMP's wire format so that the real boto3 client talks
to it through ``endpoint_url``: rest-json bodies, blobs in base64, errors as
``x-amzn-ErrorType`` + ``{"message": ...}``, 202 for changes, then CREATING/UPDATING → ACTIVE
(or *_FAILED with a reason) on the next describe, 409 while a change is in flight, 404 for an
unknown workspace or resource, 403 for a request not signed (SigV4, service ``aps``) for this
region with the expected access key. State lives in memory."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from typing import Any

import yaml

from rankwatch.sim.local_api import LocalJsonApi

AUTH = re.compile(r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,")


class AmpError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.body = status, code, {"message": message, **extra}


class FakeAMP(LocalJsonApi):
    """``with FakeAMP(region="us-west-2", access_key="AKID", workspaces=["ws-1"]) as amp: amp.url``"""

    def __init__(self, *, region: str, access_key: str, workspaces: list[str]) -> None:
        super().__init__()
        self.region = region
        self.access_key = access_key
        self.workspaces = set(workspaces)
        self.namespaces: dict[tuple[str, str], dict[str, Any]] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        self.throttle_next = 0  # answer this many requests with 429 ThrottlingException
        self.fail_next_change: str | None = None  # the next change settles as *_FAILED, this reason
        self.settle_after = 1  # describes of a changing resource before it settles
        self._lock = threading.Lock()

    def changes(self) -> list[tuple[str, str, int]]:
        """The requests that created or replaced something."""
        return [r for r in self.requests if r[0] in ("POST", "PUT")]

    # --- API ---------------------------------------------------------------------------------
    def _resource(self, store: dict[Any, dict[str, Any]], key: Any, kind: str, rid: str) -> dict[str, Any]:
        res = store.get(key)
        if res is None:
            raise AmpError(404, "ResourceNotFoundException", f"{kind} {rid} not found",
                           resourceId=rid, resourceType=kind)
        if res["status"]["statusCode"] in ("CREATING", "UPDATING"):
            res["_describes"] += 1
            if res["_describes"] >= self.settle_after:
                failed = res.pop("_fail", None)
                code = res["status"]["statusCode"]
                if failed:
                    res["status"] = {"statusCode": "CREATION_FAILED" if code == "CREATING" else "UPDATE_FAILED",
                                     "statusReason": failed}
                else:
                    res["status"] = {"statusCode": "ACTIVE"}
        return res

    def _change(self, store: dict[Any, dict[str, Any]], key: Any, kind: str, rid: str, data: Any,
                *, create: bool, validate: Any) -> dict[str, Any]:
        raw = self._decode(data)
        validate(raw)
        now = time.time()
        existing = store.get(key)
        if create and existing is not None:
            raise AmpError(409, "ConflictException", f"{kind} {rid} already exists", resourceId=rid,
                           resourceType=kind)
        if not create and existing is None:
            raise AmpError(404, "ResourceNotFoundException", f"{kind} {rid} not found", resourceId=rid,
                           resourceType=kind)
        if existing and existing["status"]["statusCode"] in ("CREATING", "UPDATING"):
            raise AmpError(409, "ConflictException", f"{kind} {rid} is {existing['status']['statusCode']}",
                           resourceId=rid, resourceType=kind)
        res = {"data": raw, "status": {"statusCode": "CREATING" if create else "UPDATING"}, "_describes": 0,
               "createdAt": existing["createdAt"] if existing else now, "modifiedAt": now}
        if self.fail_next_change:
            res["_fail"], self.fail_next_change = self.fail_next_change, None
        store[key] = res
        return res

    @staticmethod
    def _decode(data: Any) -> bytes:
        if not isinstance(data, str):
            raise AmpError(400, "ValidationException", "data is required", reason="FIELD_VALIDATION_FAILED")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise AmpError(400, "ValidationException", "data is not base64", reason="CANNOT_PARSE") from None

    @staticmethod
    def _valid_rules(raw: bytes) -> None:
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise AmpError(400, "ValidationException", f"rule groups namespace is not YAML: {exc}",
                           reason="CANNOT_PARSE") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
            raise AmpError(400, "ValidationException", "rule groups namespace has no groups",
                           reason="FIELD_VALIDATION_FAILED")

    @staticmethod
    def _valid_definition(raw: bytes) -> None:
        try:
            doc = yaml.safe_load(raw)
            cfg = yaml.safe_load(doc["alertmanager_config"])
        except (yaml.YAMLError, KeyError, TypeError):
            raise AmpError(400, "ValidationException", "alert manager definition needs alertmanager_config",
                           reason="CANNOT_PARSE") from None
        if set(doc) - {"alertmanager_config", "template_files"}:
            raise AmpError(400, "ValidationException", f"unknown keys {sorted(set(doc) - {'alertmanager_config', 'template_files'})}",
                           reason="FIELD_VALIDATION_FAILED")
        for r in cfg.get("receivers") or []:
            if any(k.endswith("_configs") and k != "sns_configs" for k in r):
                raise AmpError(400, "ValidationException", f"receiver {r.get('name')}: only SNS is supported",
                               reason="FIELD_VALIDATION_FAILED")

    def _status(self, res: dict[str, Any]) -> dict[str, Any]:
        return dict(res["status"])

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        m = re.fullmatch(r"/workspaces/([^/]+)(/.*)?", path.split("?")[0])
        if not m or m[1] not in self.workspaces:
            ws = m[1] if m else "?"
            raise AmpError(404, "ResourceNotFoundException", f"Workspace {ws} not found", resourceId=ws,
                           resourceType="Workspace")
        ws, rest = m[1], m[2] or ""
        arn = f"arn:aws:aps:{self.region}:123456789012:workspace/{ws}"
        if rest == "" and method == "GET":
            return 200, {"workspace": {"workspaceId": ws, "arn": arn, "status": {"statusCode": "ACTIVE"},
                                       "createdAt": 1.7e9}}
        if rest == "/rulegroupsnamespaces" and method == "POST":
            name = str(body.get("name") or "")
            res = self._change(self.namespaces, (ws, name), "RuleGroupsNamespace", name, body.get("data"),
                               create=True, validate=self._valid_rules)
            return 202, {"name": name, "arn": f"{arn}/{name}", "status": self._status(res)}
        if nm := re.fullmatch(r"/rulegroupsnamespaces/([^/]+)", rest):
            name = nm[1]
            if method == "GET":
                res = self._resource(self.namespaces, (ws, name), "RuleGroupsNamespace", name)
                return 200, {"ruleGroupsNamespace": {
                    "arn": f"{arn}/{name}", "name": name, "status": self._status(res),
                    "data": base64.b64encode(res["data"]).decode(), "createdAt": res["createdAt"],
                    "modifiedAt": res["modifiedAt"]}}
            if method == "PUT":
                res = self._change(self.namespaces, (ws, name), "RuleGroupsNamespace", name, body.get("data"),
                                   create=False, validate=self._valid_rules)
                return 202, {"name": name, "arn": f"{arn}/{name}", "status": self._status(res)}
        if rest == "/alertmanager/definition":
            if method == "GET":
                res = self._resource(self.definitions, ws, "AlertManagerDefinition", ws)
                return 200, {"alertManagerDefinition": {
                    "status": self._status(res), "data": base64.b64encode(res["data"]).decode(),
                    "createdAt": res["createdAt"], "modifiedAt": res["modifiedAt"]}}
            if method in ("POST", "PUT"):
                res = self._change(self.definitions, ws, "AlertManagerDefinition", ws, body.get("data"),
                                   create=method == "POST", validate=self._valid_definition)
                return 202, {"status": self._status(res)}
        raise AmpError(404, "UnknownOperationException", f"no route for {method} {path}")

    def respond(self, method: str, path: str, headers: dict[str, str],
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            auth = AUTH.match(headers.get("Authorization") or "")
            if not auth or auth["key"] != self.access_key or auth["service"] != "aps":
                raise AmpError(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
            if auth["region"] != self.region:
                raise AmpError(403, "InvalidSignatureException",
                               f"Credential should be scoped to a valid region, not '{auth['region']}'.")
            with self._lock:
                if self.throttle_next > 0:
                    self.throttle_next -= 1
                    raise AmpError(429, "ThrottlingException", "Rate exceeded")
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    raise AmpError(400, "SerializationException", "body is not JSON") from None
                status, payload = self.handle(method, path, body)
                return status, payload, {}
        except AmpError as exc:
            return exc.status, exc.body, {"x-amzn-ErrorType": exc.code}
