"""Dead and saturated units: rules over per-module activation statistics, producing :class:`bpkit.Alert`.

Pure Python over numbers that were already read back at a log step (the rule itself adds no device
work and no host read). A module is flagged once its dead (or saturated) fraction has been above the
threshold for ``patience`` consecutive log steps; it can be flagged again after it has recovered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bpkit.alert import Alert
from bpkit.errors import check_float, check_int


class ActivationRules:
    """Turn per-module dead/saturated fractions into ``dead`` and ``saturated`` alerts.

    Args:
        dead_threshold: a module is dead when more than this fraction of its units are dead (0..1).
        saturated_fraction: a module is saturated when more than this fraction of its outputs are
            saturated (0..1).
        patience: consecutive log steps above the threshold before the alert (>= 1).

    Raises:
        BpkitConfigError: a fraction outside 0..1 or a patience below 1.

    Example::

        >>> rules = ActivationRules(dead_threshold=0.5, patience=2)
        >>> rules.update(10, dead={"fc1.act": 0.9}, saturated={})
        []
        >>> [a.kind + ":" + a.where for a in rules.update(20, dead={"fc1.act": 0.95}, saturated={})]
        ['dead:fc1.act']
    """

    def __init__(self, dead_threshold: float = 0.5, saturated_fraction: float = 0.5, patience: int = 3) -> None:
        self.dead_threshold = check_float("dead_threshold", dead_threshold, 0.0, 1.0, high_inclusive=False)
        self.saturated_fraction = check_float("saturated_fraction", saturated_fraction, 0.0, 1.0,
                                              high_inclusive=False)
        self.patience = check_int("patience", patience, minimum=1)
        self._over: dict[str, dict[str, int]] = {"dead": {}, "saturated": {}}
        self._flagged: dict[str, set[str]] = {"dead": set(), "saturated": set()}

    def update(self, step: int, dead: Mapping[str, float], saturated: Mapping[str, float | None]) -> list[Alert]:
        """Feed one log step's fractions (module name -> fraction); return the alerts raised now."""
        alerts = []
        for kind, values, threshold in (("dead", dead, self.dead_threshold),
                                        ("saturated", saturated, self.saturated_fraction)):
            over, flagged = self._over[kind], self._flagged[kind]
            new: dict[str, float] = {}
            for name, value in values.items():
                if value is None:
                    continue
                if value > threshold:
                    over[name] = over.get(name, 0) + 1
                    if over[name] >= self.patience and name not in flagged:
                        flagged.add(name)
                        new[name] = value
                else:
                    over.pop(name, None)
                    flagged.discard(name)
            if new:
                alerts.append(self._alert(kind, step, new, threshold))
        return alerts

    def _alert(self, kind: str, step: int, new: dict[str, float], threshold: float) -> Alert:
        names = sorted(new)
        worst = max(new.values())
        if kind == "dead":
            listed = ", ".join(f"{n} ({100 * new[n]:.0f}% of units)" for n in names)
            message = (f"dead units in {listed}: they output exactly zero for every sample of the batch "
                       f"({self.patience} log steps in a row) and pass no gradient. Try He init, LeakyReLU/GELU, "
                       f"a lower learning rate or normalization before the activation.")
        else:
            listed = ", ".join(f"{n} ({100 * new[n]:.0f}% of outputs)" for n in names)
            message = (f"saturated units in {listed} ({self.patience} log steps in a row): their gradient "
                       f"vanishes. Try smaller initial weights (Xavier/Glorot), normalization, or ReLU-family "
                       f"activations.")
        return Alert(kind, int(step), ", ".join(names), float(worst), float(threshold), message)

    def state_dict(self) -> dict[str, Any]:
        return {"over": {k: dict(v) for k, v in self._over.items()},
                "flagged": {k: sorted(v) for k, v in self._flagged.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._over = {k: dict(state.get("over", {}).get(k, {})) for k in ("dead", "saturated")}
        self._flagged = {k: set(state.get("flagged", {}).get(k, ())) for k in ("dead", "saturated")}
