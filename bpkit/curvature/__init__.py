"""Curvature of the loss surface by Hessian-vector products (double backward): the top and most negative Hessian
eigenvalues (Lanczos), the trace (Hutchinson), the sharpness against the learning rate (edge of stability) and the
``sharpness``/``saddle`` rules. Pure torch: no Lightning import; :class:`bpkit.callbacks.CurvatureMonitor` drives it
in a Lightning Trainer.

Example::

    >>> import torch
    >>> from bpkit.curvature import CurvatureProbe
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> m = CurvatureProbe().measure(lambda: (torch.arange(1.0, 4.0) * w ** 2).sum(), [w], step=0)
    >>> round(m["curvature/lambda_max"], 4), round(m["curvature/trace"], 4)
    (6.0, 12.0)
"""

from bpkit.curvature.hvp import HessianOperator
from bpkit.curvature.lanczos import LanczosResult, TraceEstimate, hutchinson_trace, lanczos, rademacher
from bpkit.curvature.probe import DEFAULT_EVERY_N_STEPS, METRICS, CurvatureProbe
from bpkit.curvature.rules import Stability, saddle_alert, sharpness_alert, stability
from bpkit.curvature.state import preserved_module, preserved_rng

__all__ = ["DEFAULT_EVERY_N_STEPS", "METRICS", "CurvatureProbe", "HessianOperator", "LanczosResult", "Stability",
           "TraceEstimate", "hutchinson_trace", "lanczos", "preserved_module", "preserved_rng", "rademacher",
           "saddle_alert", "sharpness_alert", "stability"]
