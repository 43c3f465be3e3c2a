"""Create or update rankwatch's rule groups namespace and alert manager definition in an Amazon
Managed Service for Prometheus workspace, through boto3 (credentials from the default chain:
environment, shared config/profile, SSO, instance or pod role; never from rankwatch's flags).

Each resource is read first: identical and ACTIVE → left alone, so a second run changes nothing;
missing → created; different → replaced. AMP applies changes asynchronously (202, then
CREATING/UPDATING → ACTIVE or *_FAILED), so each change is followed until it settles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rankwatch.errors import RankwatchError

log = logging.getLogger(__name__)

SETTLED = {"ACTIVE", "CREATION_FAILED", "UPDATE_FAILED"}
# IAM actions a deploy needs (docs/amp.md has the policy).
ACTIONS = ("aps:DescribeWorkspace", "aps:DescribeRuleGroupsNamespace", "aps:CreateRuleGroupsNamespace", "aps:PutRuleGroupsNamespace",
           "aps:DescribeAlertManagerDefinition", "aps:CreateAlertManagerDefinition",
           "aps:PutAlertManagerDefinition")


@dataclass
class Outcome:
    what: str  # "rule groups namespace rankwatch" / "alert manager definition"
    action: str  # "created", "updated", "unchanged"
    status: str  # AMP's status code once settled


def amp_client(region: str, endpoint_url: str | None = None) -> Any:
    """A boto3 AMP client for ``region``; standard retries absorb throttling and 5xx."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RankwatchError("`rankwatch deploy amp` needs boto3: pip install 'rankwatch[aws]'") from None
    config = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=10, read_timeout=30,
                    user_agent_extra="rankwatch")
    return boto3.session.Session().client("amp", region_name=region, endpoint_url=endpoint_url, config=config)


class AmpDeployer:
    """The describe/create/put calls for one workspace, with AWS errors turned into one-line
    messages that name the workspace, the resource and what to do."""

    def __init__(self, client: Any, workspace_id: str, *, wait_timeout_s: float = 300.0,
                 poll_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.workspace_id = workspace_id
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self._sleep = sleep

    # --- errors ------------------------------------------------------------------------------
    def _fail(self, exc: Exception, doing: str) -> RankwatchError:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
        )

        if isinstance(exc, NoCredentialsError):
            return RankwatchError("no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                  "or run where an instance/pod role is available")
        if isinstance(exc, NoRegionError):
            return RankwatchError("no AWS region: pass --region")
        if isinstance(exc, EndpointConnectionError):
            return RankwatchError(f"cannot reach the AMP endpoint while {doing}: {exc}")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, message = err.get("Code", "?"), err.get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            hint = {
                "AccessDeniedException": f"the caller needs {', '.join(ACTIONS)} on the workspace",
                "UnrecognizedClientException": "the AWS credentials are not valid",
                "InvalidSignatureException": "the AWS credentials are not valid",
                "ResourceNotFoundException": f"is {self.workspace_id} a workspace in this region?",
                "ConflictException": "another change is still being applied; rerun once it is ACTIVE",
                "ValidationException": "AMP refused the payload; `--dry-run` writes it for promtool/amtool",
                "ServiceQuotaExceededException": "an AMP quota is reached (Service Quotas console)",
                "ThrottlingException": "AMP kept throttling after retries; rerun later",
            }.get(code, "")
            fields = "; ".join(f"{f.get('name')}: {f.get('message')}" for f in err.get("fieldList", []) or [])
            detail = f"{message} ({fields})" if fields else message
            return RankwatchError(f"AMP {code} ({status}) while {doing} in workspace {self.workspace_id}: "
                                  f"{detail}" + (f"; {hint}" if hint else ""))
        if isinstance(exc, BotoCoreError):
            return RankwatchError(f"AWS SDK error while {doing}: {exc}")
        raise exc

    def _call(self, doing: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, doing) from None

    def _describe(self, doing: str, fn: Callable[..., Any], key: str, **kwargs: Any) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)[key]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException" and self._workspace_exists():
                return None
            raise self._fail(exc, doing) from None
        except BotoCoreError as exc:
            raise self._fail(exc, doing) from None

    def _workspace_exists(self) -> bool:
        """A missing resource and a missing workspace are both 404s; tell them apart."""
        from botocore.exceptions import ClientError

        try:
            self.client.describe_workspace(workspaceId=self.workspace_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return False
            raise self._fail(exc, f"looking up workspace {self.workspace_id}") from None
        return True

    # --- waiting -----------------------------------------------------------------------------
    def _settle(self, what: str, describe: Callable[[], dict[str, Any] | None]) -> str:
        """Poll until AMP reports a settled status; a failed one is an error with AMP's reason."""
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            desc = describe()
            status = (desc or {}).get("status", {})
            code = status.get("statusCode", "MISSING")
            if code in SETTLED:
                if code != "ACTIVE":
                    raise RankwatchError(f"AMP could not apply the {what} ({code}): {status.get('statusReason', '')}")
                return code
            if time.monotonic() >= deadline:
                raise RankwatchError(f"the {what} is still {code} after {self.wait_timeout_s:.0f} s; "
                                     "check it in the AMP console or rerun later")
            self._sleep(self.poll_s)

    # --- resources ---------------------------------------------------------------------------
    def _ensure(self, what: str, data: str, describe: Callable[[], dict[str, Any] | None],
                create: Callable[[], Any], put: Callable[[], Any]) -> Outcome:
        current = describe()
        if current and current["status"]["statusCode"] not in SETTLED:
            self._settle(what, describe)  # a change still in flight: let it finish, then compare
            current = describe()
        if current is None:
            self._call(f"creating the {what}", create)
            action = "created"
        elif current["data"] == data.encode() and current["status"]["statusCode"] == "ACTIVE":
            return Outcome(what, "unchanged", "ACTIVE")
        else:
            self._call(f"updating the {what}", put)
            action = "updated"
        return Outcome(what, action, self._settle(what, describe))

    def ensure_rule_groups_namespace(self, name: str, data: str) -> Outcome:
        what = f"rule groups namespace {name!r}"
        ids = {"workspaceId": self.workspace_id, "name": name}
        return self._ensure(
            what, data,
            lambda: self._describe(f"reading the {what}", self.client.describe_rule_groups_namespace,
                                   "ruleGroupsNamespace", **ids),
            lambda: self.client.create_rule_groups_namespace(**ids, data=data.encode()),
            lambda: self.client.put_rule_groups_namespace(**ids, data=data.encode()))

    def ensure_alert_manager_definition(self, data: str) -> Outcome:
        what = "alert manager definition"
        ids = {"workspaceId": self.workspace_id}
        return self._ensure(
            what, data,
            lambda: self._describe(f"reading the {what}", self.client.describe_alert_manager_definition,
                                   "alertManagerDefinition", **ids),
            lambda: self.client.create_alert_manager_definition(**ids, data=data.encode()),
            lambda: self.client.put_alert_manager_definition(**ids, data=data.encode()))
