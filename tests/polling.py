"""Waiting for a condition with a deadline: the one polling helper every test folder uses."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or the deadline passes (then fail).

    The interval is a polling period, not synchronisation: the deadline bounds the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
