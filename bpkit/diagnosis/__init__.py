"""A run's diagnosis and figures, from its run record: pure Python, numpy and matplotlib (no Lightning).

``bpkit-report`` (:mod:`bpkit.report`) renders them as HTML; :class:`bpkit.callbacks.RunRecord` uses them at the
end of fit (the gradient-flow image, ``wandb.alert`` per finding). :mod:`bpkit.diagnosis.plots` imports
matplotlib and is not imported here.

Example::

    >>> from pathlib import Path
    >>> from bpkit.diagnosis import diagnose, summary_line
    >>> from bpkit.record import RunData
    >>> summary_line(diagnose(RunData(path=Path("bpkit_record.jsonl"))))
    'No problems found'
"""

from bpkit.diagnosis.findings import NO_PROBLEMS, NO_STATISTICS, Finding, diagnose, summary_line, train_loss_keys

__all__ = ["NO_PROBLEMS", "NO_STATISTICS", "Finding", "diagnose", "summary_line", "train_loss_keys"]
