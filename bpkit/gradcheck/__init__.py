"""Gradient checking for whole models: finite differences against autograd on a real batch.

Pure torch (no Lightning import): a LightningModule is recognised by its ``training_step``.

Example::

    >>> import torch
    >>> from bpkit.gradcheck import check_gradients
    >>> from bpkit.models import MLP
    >>> batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    >>> check_gradients(MLP(8, 3, depth=3, width=16), batch, loss_fn=torch.nn.functional.cross_entropy).passed
    True
"""

from bpkit.gradcheck.check import MODES, check_gradients
from bpkit.gradcheck.independence import check_batch_independence
from bpkit.gradcheck.report import (BatchIndependenceReport, GradcheckError, GradcheckReport, GradcheckUnsupported,
                                    ParamCheck)

__all__ = ["MODES", "BatchIndependenceReport", "GradcheckError", "GradcheckReport", "GradcheckUnsupported",
           "ParamCheck", "check_batch_independence", "check_gradients"]
