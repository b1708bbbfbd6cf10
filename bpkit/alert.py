"""The one record every bpkit monitor produces when it finds a problem."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ALERT_KINDS = ("vanishing", "exploding", "nonfinite", "spike", "dead", "saturated", "gradcheck", "unused", "sharpness",
               "saddle")


@dataclass(frozen=True)
class Alert:
    """A problem found by a bpkit monitor, in plain words.

    Args:
        kind: one of ``vanishing, exploding, nonfinite, spike, dead, saturated, gradcheck, unused, sharpness,
            saddle`` (``unused``: a parameter that got an exactly zero gradient on every step because its input is
            all zeros: structurally unused, not vanishing; ``sharpness``: the loss surface is too curved for the
            learning rate; ``saddle``: a small gradient with significant negative curvature).
        step: the step at which it was seen (Lightning's logging step of that batch, the step of its ``train/loss``).
        where: parameter or module name(s) as in ``named_parameters()``/``named_modules()``;
            several names are joined with ``", "``.
        value: the measured value that triggered the alert.
        threshold: the threshold it crossed.
        message: one plain sentence saying what is wrong and what to try.
        origin: where the problem starts, when it is known (the module where a NaN first appears, the module
            that mixes the samples of a batch, and the samples involved); ``None`` otherwise.

    Example::

        >>> a = Alert("nonfinite", 12, "blocks.3.linear.weight", float("nan"), 0.0, "NaN gradient")
        >>> a.kind, a.where
        ('nonfinite', 'blocks.3.linear.weight')
    """

    kind: str
    step: int
    where: str
    value: float
    threshold: float
    message: str
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"Alert kind={self.kind!r} is invalid; expected one of {', '.join(ALERT_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alert":
        """The alert back from :meth:`to_dict` (a checkpoint, the run record); keys it does not know are ignored.

        Example::

            >>> a = Alert("spike", 3, "loss", 9.0, 4.0, "loss spike")
            >>> Alert.from_dict({**a.to_dict(), "extra": 1}) == a
            True
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __str__(self) -> str:
        return f"[bpkit {self.kind} @ step {self.step}] {self.message}"
