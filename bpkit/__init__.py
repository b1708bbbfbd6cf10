"""bpkit: backpropagation made visible and controllable inside PyTorch Lightning 2.x."""

from bpkit.alert import ALERT_KINDS, Alert
from bpkit.errors import BpkitConfigError

__version__ = "0.2.0"
__all__ = ["ALERT_KINDS", "Alert", "BpkitConfigError", "__version__"]
