"""bpkit: backpropagation made visible and controllable inside PyTorch Lightning 2.x."""

from bpkit.alert import ALERT_KINDS, Alert
from bpkit.errors import BpkitConfigError

__version__ = "0.3.0"
__all__ = ["ALERT_KINDS", "ActivationProbe", "Alert", "BpkitConfigError", "GradientProbe", "TemporalProbe",
           "__version__"]


def __getattr__(name: str):
    # the engines load torch: imported on first use, so `import bpkit` stays light
    if name in ("GradientProbe", "ActivationProbe", "TemporalProbe"):
        import bpkit.probe

        return getattr(bpkit.probe, name)
    raise AttributeError(f"module 'bpkit' has no attribute {name!r}")
