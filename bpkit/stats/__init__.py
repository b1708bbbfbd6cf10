"""Fused, sync-free statistics of many tensors at once. Pure torch: never imports Lightning.

- :mod:`bpkit.stats.norms`: per-tensor and total norms (``foreach_norms``, ``total_norm``), max-abs, per-group norms.
- :mod:`bpkit.stats.grads`: :func:`grad_stats`, everything GradientMonitor needs on a step.
- :mod:`bpkit.stats.histograms`: fixed-range log10-magnitude histograms.
- :mod:`bpkit.stats.updates`: exact update-to-weight ratios.
- :mod:`bpkit.stats.readback`: one host copy per log interval.
"""
