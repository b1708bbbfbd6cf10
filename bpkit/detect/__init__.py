"""Rules over gradient statistics that yield :class:`bpkit.Alert`. Never imports Lightning.

The statistics are computed on the device every step and buffered there (see
``GradientMonitor``); once per log interval the buffer is copied to the host in one read and
replayed through these rules, step by step, in a few float operations each. Each detector
keeps a small state (counters, running medians, EMAs) that is saved in checkpoints, and
reports the events since its last report as alerts that name the step they happened on.
"""

from bpkit.detect.exploding import ExplodingDetector, ExplodingGradientError
from bpkit.detect.nonfinite import NonFiniteDetector, NonFiniteGradientError
from bpkit.detect.spike import SpikeDetector
from bpkit.detect.steady import SteadyExplosionDetector
from bpkit.detect.vanishing import VanishingDetector

__all__ = ["ExplodingDetector", "ExplodingGradientError", "NonFiniteDetector", "NonFiniteGradientError", "SpikeDetector", "SteadyExplosionDetector",
           "VanishingDetector"]
