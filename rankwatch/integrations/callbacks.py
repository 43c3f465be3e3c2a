"""Shared by the framework callbacks: their errors belong to the probe, never to training."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("rankwatch.probe")


def guarded(fn: F) -> F:
    """Run a callback or hook; an error inside is the probe's (logged once, counted), never
    the training loop's."""
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            if self.probe is not None:
                self.probe._fail(f"{type(self).__name__}.{fn.__name__}", exc)
            else:
                log.warning("rankwatch %s.%s failed: %s", type(self).__name__, fn.__name__, exc)
            return None
    return wrapper  # type: ignore[return-value]
