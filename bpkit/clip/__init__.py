"""Gradient clipping policies: small stateful objects that clip ``.grad`` in place, state on the device.

Pure torch (no Lightning import). Pick one by name::

    >>> import torch
    >>> from bpkit.clip import make_policy
    >>> net = torch.nn.Linear(4, 2)
    >>> net(torch.randn(8, 4)).sum().backward()
    >>> result = make_policy("norm", max_norm=0.1).clip_(net.parameters())
    >>> bool(result.norm_post <= 0.1 + 1e-6)
    True
"""

from __future__ import annotations

from typing import Any

from bpkit.clip._base import ClipPolicy, ClipResult
from bpkit.clip.agc import AGC
from bpkit.clip.autoclip import AutoClip
from bpkit.clip.norm import NormClip
from bpkit.clip.skip import SkipOnSpike
from bpkit.clip.value import ValueClip
from bpkit.clip.zclip import ZClip
from bpkit.errors import BpkitConfigError, check_choice

POLICIES: dict[str, type[ClipPolicy]] = {
    "norm": NormClip,
    "value": ValueClip,
    "agc": AGC,
    "autoclip": AutoClip,
    "zclip": ZClip,
    "skip": SkipOnSpike,
}


def make_policy(name: str, **kwargs: Any) -> ClipPolicy:
    """Build a policy by name (``norm, value, agc, autoclip, zclip, skip``) with its arguments.

    Raises:
        BpkitConfigError: for an unknown name, or an argument the policy does not take or rejects.
    """
    check_choice("policy", name, POLICIES)
    cls = POLICIES[name]
    try:
        return cls(**kwargs)
    except TypeError as exc:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        bad = sorted(set(kwargs) - set(accepted))
        raise BpkitConfigError(f"{name}.{bad[0]}" if bad else name, kwargs.get(bad[0]) if bad else kwargs,
                               f"arguments of the {name!r} policy: {', '.join(accepted)}") from exc


__all__ = ["AGC", "POLICIES", "AutoClip", "ClipPolicy", "ClipResult", "NormClip", "SkipOnSpike", "ValueClip",
           "ZClip", "make_policy"]
