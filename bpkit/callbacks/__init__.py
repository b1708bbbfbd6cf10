"""Lightning callbacks: thin adapters over bpkit's pure-torch engines.

Example::

    >>> from lightning.pytorch import Trainer
    >>> from bpkit.callbacks import GradientMonitor, ActivationMonitor, GradientClipping
    >>> trainer = Trainer(callbacks=[GradientMonitor(), ActivationMonitor(), GradientClipping("zclip")],
    ...                   logger=False, enable_progress_bar=False, enable_model_summary=False)
"""

from importlib import import_module

_EXPORTS = {
    "GradientMonitor": "bpkit.callbacks.gradient_monitor",
    "ActivationMonitor": "bpkit.callbacks.activation_monitor",
    "GradientClipping": "bpkit.callbacks.gradient_clipping",
    "GradientCheck": "bpkit.callbacks.gradient_check",
    "RunRecord": "bpkit.callbacks.run_record",
    "CurvatureMonitor": "bpkit.callbacks.curvature_monitor",
    "NoiseScaleMonitor": "bpkit.callbacks.noise_scale_monitor",
    "TemporalGradientMonitor": "bpkit.callbacks.temporal_gradient_monitor",
    "WeightDrift": "bpkit.callbacks.weight_drift",
    "GradualUnfreeze": "bpkit.callbacks.finetuning",
    "BackboneUnfreeze": "bpkit.callbacks.finetuning",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bpkit.callbacks' has no attribute {name!r}")
