"""The figures of a run's report: re-exported from :mod:`bpkit.diagnosis.plots`, where they live below the
callbacks so that :class:`bpkit.callbacks.RunRecord` can use them too (at the end of fit) without importing the report.
"""

from bpkit.diagnosis.plots import *  # noqa: F401,F403
from bpkit.diagnosis.plots import __all__  # noqa: F401
