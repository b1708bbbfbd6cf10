"""One error type for bad input, with messages that name the key, the value and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class BpkitConfigError(ValueError):
    """Bad configuration or argument.

    The message always names the key, the bad value and the accepted values, e.g.
    ``model.depth=-1 is invalid: expected an integer >= 1``. It is a ``ValueError``, so code that catches
    those keeps working.

    Args:
        key: the argument or config key, e.g. ``"on_nonfinite"`` or ``"model.depth"``.
        value: the value that was given.
        expected: what is accepted, in words (``"one of warn, skip, stop, raise"``).

    Example::

        >>> from bpkit import BpkitConfigError
        >>> error = BpkitConfigError("depth", -1, "an integer >= 1").with_prefix("model")
        >>> print(error)
        model.depth=-1 is invalid: expected an integer >= 1
        >>> (error.key, error.value, isinstance(error, ValueError))
        ('model.depth', -1, True)
    """

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"{key}={value!r} is invalid: expected {expected}")

    def with_prefix(self, prefix: str) -> "BpkitConfigError":
        """The same error with its key qualified, e.g. ``depth`` -> ``model.depth``."""
        return BpkitConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.expected)


def check_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``, else a :class:`BpkitConfigError` that lists them.

    Example::

        >>> check_choice("on_nonfinite", "skip", ["warn", "skip"])
        'skip'
        >>> check_choice("on_nonfinite", "Ab", ["warn", "skip"])
        Traceback (most recent call last):
        ...
        bpkit.errors.BpkitConfigError: on_nonfinite='Ab' is invalid: expected one of warn, skip
    """
    choices = tuple(choices)
    if value not in choices:
        raise BpkitConfigError(key, value, "one of " + ", ".join(choices))
    return value


def check_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BpkitConfigError(key, value, f"an integer >= {minimum}")
    return value


def check_float(key: str, value: Any, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else (f">= {low}" if low_inclusive else f"> {low}")
        hi = "" if high is None else (f"<= {high}" if high_inclusive else f"< {high}")
        rng = " and ".join(s for s in (lo, hi) if s)
        raise BpkitConfigError(key, value, f"a number {rng}".strip())
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    """A real bool (``bool("false")`` is True: a string from a config file would silently mean the opposite)."""
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
