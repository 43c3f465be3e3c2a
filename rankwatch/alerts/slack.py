"""Slack delivery with slack_sdk: a bot token + channel (``WebClient``: post, update the same
message on resolve, reply in its thread, attach a chart) or an incoming webhook
(``WebhookClient``: post only; Slack webhooks can neither edit messages nor upload files).

Both clients get slack_sdk's retry handlers: 429 is retried after ``Retry-After``, 500/503 with
backoff, and connection errors raised before the request was sent. An error after it was sent
(a read timeout, a reset or closed connection) is never retried blindly: the message may have
been posted, so the ``DeliveryError`` says ``unsure`` and the sink looks for it
(``find_posted``: the idempotency key in the message metadata) before posting again.
``WebhookClient`` never raises on an HTTP error, so its status and body are checked here.
Whatever still fails is a ``DeliveryError`` and the notification stays in the outbox for the
next attempt, unless Slack refused the message itself (``invalid_blocks``, HTTP 400 from a
webhook): that is reported once and not retried."""

from __future__ import annotations

import logging
import time
from http.client import RemoteDisconnected
from typing import Any
from urllib.error import URLError

from slack_sdk import WebClient, WebhookClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler, RetryHandler
from slack_sdk.http_retry.builtin_handlers import ServerErrorRetryHandler

from rankwatch.alerts.charts import render_compute_chart, series_from_evidence, series_from_prometheus
from rankwatch.alerts.config import LinksConfig, SlackConfig
from rankwatch.alerts.delivery import DeliveryError
from rankwatch.alerts.lifecycle import IncidentView
from rankwatch.alerts.render import render_incident, render_thread_reply, short_where
from rankwatch.secrets import RedactingFilter, redact

log = logging.getLogger(__name__)
# slack_sdk logs request URLs at DEBUG; a webhook URL is a secret, so its logger stays quiet.
_sdk_log = logging.getLogger("rankwatch.alerts.slack.sdk")
_sdk_log.setLevel(logging.WARNING)
# slack_sdk puts the exception text into its ERROR line; it must never show a token or URL.
_sdk_log.addFilter(RedactingFilter())

METADATA_EVENT_TYPE = "rankwatch_alert"
# Slack API errors that this message will get again however often it is sent.
PERMANENT_API_ERRORS = frozenset({
    "invalid_blocks", "invalid_blocks_format", "msg_too_long", "no_text", "too_many_attachments",
    "invalid_metadata_format", "invalid_metadata_schema", "metadata_too_large", "invalid_arguments",
})
# conversations.history / .replies answers meaning "this token can never read it".
HISTORY_UNREADABLE = frozenset({"missing_scope", "not_allowed_token_type", "no_permission", "not_in_channel",
                                "method_not_supported_for_channel_type"})
# Raised after the request went out: it may have been processed.
_MAYBE_SENT = (TimeoutError, ConnectionResetError, RemoteDisconnected, ConnectionAbortedError, BrokenPipeError)


def retry_handlers(max_retries: int) -> list[RetryHandler]:
    return [
        # urllib wraps only errors raised while connecting and sending in URLError; a timeout or
        # reset while waiting for the answer is raw, and retrying it could post twice.
        ConnectionErrorRetryHandler(max_retry_count=max_retries, error_types=[URLError]),
        RateLimitErrorRetryHandler(max_retry_count=max_retries),
        ServerErrorRetryHandler(max_retry_count=max_retries),
    ]


def _api_error(exc: SlackApiError) -> DeliveryError:
    resp = exc.response
    code = resp.get("error") if resp is not None else None
    retry_after = None
    if resp is not None and resp.status_code == 429:
        try:
            retry_after = float(resp.headers.get("Retry-After", resp.headers.get("retry-after", 1)))
        except (TypeError, ValueError):
            retry_after = 1.0
    status = resp.status_code if resp is not None else "?"
    return DeliveryError(f"Slack API error {code or 'unknown'} (HTTP {status})", retry_after,
                         permanent=code in PERMANENT_API_ERRORS)


class SlackNotifier:
    name = "slack"
    per_episode = False

    def __init__(self, cfg: SlackConfig, links: LinksConfig) -> None:
        self.cfg = cfg
        self.links = links
        handlers = retry_handlers(cfg.max_retries)
        self.web: WebClient | None = None
        self.webhook: WebhookClient | None = None
        if cfg.bot_token:
            # slack_sdk annotates timeout as int but hands it to urlopen, which takes seconds as a
            # float: int() made a timeout_s below 1 into 0, a non-blocking socket.
            self.web = WebClient(token=cfg.bot_token, base_url=cfg.api_url, timeout=cfg.timeout_s,  # type: ignore[arg-type]
                                 retry_handlers=handlers, logger=_sdk_log)
        else:
            self.webhook = WebhookClient(str(cfg.webhook_url), timeout=cfg.timeout_s,  # type: ignore[arg-type]
                                         retry_handlers=handlers, logger=_sdk_log)

    def wants(self, action: str) -> bool:
        if self.web is not None:
            return True
        # A webhook cannot edit the message: joined or recovered ranks show in the resolved message.
        return action in ("firing", "resolved", "reminder")

    # -- delivery -------------------------------------------------------------------------------

    def deliver(self, action: str, view: IncidentView, prior: dict[str, Any] | None, key: str) -> dict[str, Any]:
        try:
            if self.web is not None:
                return self._deliver_bot(action, view, prior, key)
            return self._deliver_webhook(action, view)
        except SlackApiError as exc:
            raise _api_error(exc) from None
        except _MAYBE_SENT as exc:
            raise DeliveryError(f"no answer from Slack ({type(exc).__name__} after {self.cfg.timeout_s:g} s timeout "
                                "or a dropped connection): the message may have been posted", unsure=True) from None
        except (SlackClientError, OSError) as exc:
            # Connection errors: the message names the reason, never the webhook path.
            raise DeliveryError(f"Slack unreachable: {type(exc).__name__}") from None

    def _deliver_webhook(self, action: str, view: IncidentView) -> dict[str, Any]:
        assert self.webhook is not None
        msg = render_incident(view, action, self.links, now=time.time())
        resp = self.webhook.send(text=msg.text, blocks=msg.blocks, unfurl_links=False, unfurl_media=False)
        if resp.status_code != 200 or (resp.body or "").strip() != "ok":
            retry_after = None
            if resp.status_code == 429:
                try:
                    retry_after = float((resp.headers or {}).get("Retry-After", ["1"])[0])
                except (TypeError, ValueError, IndexError):
                    retry_after = 1.0
            # 400 (invalid_payload, invalid_blocks) will come again for this message; 403/404 mean a
            # revoked webhook, which the operator fixes: the message waits for the new one.
            raise DeliveryError(f"Slack webhook answered HTTP {resp.status_code}: {redact(resp.body or '')[:100]}",
                                retry_after, permanent=resp.status_code == 400)
        return {"transport": "webhook"}

    def _deliver_bot(self, action: str, view: IncidentView, prior: dict[str, Any] | None, key: str) -> dict[str, Any]:
        assert self.web is not None
        channel = str(self.cfg.channel)
        ts = prior.get("ts") if prior else None
        channel = prior.get("channel", channel) if prior else channel
        msg = render_incident(view, action, self.links, now=time.time())
        metadata = {"event_type": METADATA_EVENT_TYPE, "event_payload": {"key": key, "incident": view.id}}
        if action == "firing" or ts is None:
            resp = self.web.chat_postMessage(channel=channel, text=msg.text, blocks=msg.blocks, metadata=metadata,
                                             unfurl_links=False, unfurl_media=False)
            result = {"transport": "bot", "channel": resp["channel"], "ts": resp["ts"]}
            # The message is out: nothing below may fail the delivery (a retry would post twice).
            if action == "firing" and self.cfg.chart:
                self._attach_chart(view, resp["channel"], resp["ts"])
            return result
        if action in ("update", "resolved"):
            # chat.update is idempotent: it goes first; the thread reply (not idempotent) last.
            self.web.chat_update(channel=channel, ts=ts, text=msg.text, blocks=msg.blocks)
            if action == "update":
                return {"transport": "bot", "channel": channel, "ts": ts}
        reply = self.web.chat_postMessage(channel=channel, thread_ts=ts, text=render_thread_reply(view, action),
                                          reply_broadcast=(action == "reminder"), metadata=metadata)
        return {"transport": "bot", "channel": channel, "ts": ts, "reply_ts": reply["ts"]}

    def _attach_chart(self, view: IncidentView, channel: str, ts: str) -> None:
        ev = view.culprit.firing
        try:
            data = series_from_evidence(ev)
            if data is None and self.links.prometheus_url:
                data = series_from_prometheus(self.links.prometheus_url, ev, window_s=self.cfg.chart_window_s)
            if data is None:
                return
            title = f"{ev.run or ''} {short_where(ev)}: compute time per step vs peers".strip()
            png = render_compute_chart(data, title=title, culprit_label=f"rank {ev.rank}" if ev.rank is not None else "culprit")
            assert self.web is not None
            self.web.files_upload_v2(channel=channel, thread_ts=ts, content=png, filename=f"rankwatch-incident-{view.id}.png",
                                     title=title, alt_txt=f"Compute time per step of {short_where(ev)} against its peers")
        except Exception as exc:  # the alert itself is delivered; the chart is a bonus
            log.warning("slack: chart for incident %s not attached: %s", view.id,
                        redact(type(exc).__name__ + ": " + str(exc))[:200])

    def find_posted(self, key: str, since: float, thread_ts: str | None = None) -> dict[str, Any] | None:
        """Was the message with this idempotency key posted (after a crash between posting and
        recording, or a timeout)? Top-level messages are looked up in the channel history, thread
        replies in the thread of ``thread_ts``. Webhooks cannot read anything back: None, and the
        notification is sent again (at least once)."""
        if self.web is None:
            return None
        channel = str(self.cfg.channel)
        try:
            if thread_ts:
                resp = self.web.conversations_replies(channel=channel, ts=thread_ts, include_all_metadata=True,
                                                      limit=200)
            else:
                resp = self.web.conversations_history(channel=channel, oldest=f"{since - 60:.6f}",
                                                      include_all_metadata=True, limit=200)
        except SlackApiError as exc:
            code = exc.response.get("error") if exc.response is not None else None
            # A token without channels:history can never look: say so, and let the sink post
            # again (at least once) rather than hold the notification for ever.
            raise DeliveryError(f"cannot check Slack history: {_api_error(exc)}",
                                permanent=code in HISTORY_UNREADABLE) from None
        except (SlackClientError, OSError) as exc:
            raise DeliveryError(f"cannot check Slack history: {type(exc).__name__}") from None
        for m in resp.get("messages", []):
            md = m.get("metadata") or {}
            if md.get("event_type") == METADATA_EVENT_TYPE and (md.get("event_payload") or {}).get("key") == key:
                if thread_ts:
                    return {"transport": "bot", "channel": channel, "ts": thread_ts, "reply_ts": m.get("ts"),
                            "recovered": True}
                return {"transport": "bot", "channel": channel, "ts": m.get("ts"), "recovered": True}
        return None
