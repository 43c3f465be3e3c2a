"""The one error every notifier raises when a notification did not get through."""

from __future__ import annotations


class DeliveryError(Exception):
    """A notification was not delivered; ``retry_after`` (s) when the target said when to retry.
    The row stays in the outbox and is tried again later, unless ``permanent``: the target
    refused this notification and will refuse it again (HTTP 4xx other than 408 and 429).
    ``unsure``: the request may have arrived (a timeout or a dropped connection after it was
    sent), so the target is asked before the notification is sent again."""

    def __init__(self, message: str, retry_after: float | None = None, *, permanent: bool = False,
                 unsure: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent
        self.unsure = unsure


def is_permanent_status(status: int) -> bool:
    """A 4xx answer means "this request will never succeed", except 408 (request timeout) and
    429 (rate limited), which ask to try again later."""
    return 400 <= status < 500 and status not in (408, 429)
