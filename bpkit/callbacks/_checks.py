"""Argument checks the callbacks share beyond :mod:`bpkit.errors` (a flag must be a real bool: ``bool("false")``
is True, so a string from a config file would silently mean the opposite)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bpkit.errors import BpkitConfigError


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BpkitConfigError(key, value, "true or false")
    return value


def check_globs(key: str, value: Any) -> tuple[str, ...]:
    """``None``, a glob string or a list of non-empty glob strings -> a tuple of globs."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: tuple[Any, ...] = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, Mapping):
        items = tuple(value)
    else:
        items = (None,)
    if not items or any(not isinstance(item, str) or not item for item in items):
        raise BpkitConfigError(key, value, "a glob string or a list of glob strings such as 'blocks.*.weight'")
    return items
