"""Rules over on-device statistics that yield :class:`bpkit.Alert`. Pure torch: never imports Lightning.

Each detector keeps a little state on the device (counters, running medians, EMAs), is updated
every step without a host read, and turns one read-back copy into alerts at log time.
"""

from bpkit.detect.exploding import ExplodingDetector, ExplodingGradientError
from bpkit.detect.nonfinite import NonFiniteDetector, NonFiniteGradientError
from bpkit.detect.spike import SpikeDetector
from bpkit.detect.vanishing import VanishingDetector

__all__ = ["ExplodingDetector", "ExplodingGradientError", "NonFiniteDetector", "NonFiniteGradientError", "SpikeDetector", "VanishingDetector"]
