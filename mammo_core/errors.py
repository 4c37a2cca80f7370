"""Errors shared by the library.

``BadItem`` marks one input item (a file, a CSV row, a mask) as unusable: callers quarantine it with
its reason and go on with the others. Everything else is a real failure of the stage.
"""

from __future__ import annotations


class BadItem(Exception):
    """One input item cannot be used; ``item`` names it and ``reason`` says why."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = str(item)
        self.reason = reason


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the file and the key."""
