"""The one error every notifier raises when a notification did not get through."""

from __future__ import annotations


class DeliveryError(Exception):
    """A notification was not delivered; ``retry_after`` (s) when the target said when to retry.
    The row stays in the outbox and is tried again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
