"""The report's curvature plot: ``lambda_max x lr`` over the steps against the stability limit 2 (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_sharpness(steps: Sequence[float], sharpness_x_lr: Sequence[float], path: str | Path,
                   lambda_min_ratio: Sequence[float] | None = None, limit: float = 2.0,
                   title: str = "Sharpness against the learning rate") -> Path:
    """Write a PNG of ``curvature/sharpness_x_lr`` per step with a dashed line at the stability limit ``limit``
    (above it gradient descent diverges along the top Hessian eigenvector; training at the edge of stability
    hovers just around it). Optionally a second panel of ``lambda_min / lambda_max`` (below 0: negative
    curvature, a saddle when the gradient is small).

    Args:
        steps: the probe steps.
        sharpness_x_lr: ``curvature/sharpness_x_lr`` at those steps.
        path: the PNG to write (its folder is created).
        lambda_min_ratio: optional ``curvature/lambda_min / curvature/lambda_max`` at those steps.
        limit: the stability limit (2).
        title: the figure's title.

    Returns:
        The path written.

    Example::

        >>> import tempfile, os
        >>> out = plot_sharpness([0, 5, 10], [0.4, 2.3, 1.9], os.path.join(tempfile.mkdtemp(), "s.png"))
        >>> out.stat().st_size > 1000
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 2 if lambda_min_ratio is not None else 1
    fig = plt.figure(figsize=(6.4, 2.6 * rows + 0.6))
    draw_sharpness(fig, steps, sharpness_x_lr, lambda_min_ratio, limit, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_sharpness(fig, steps: Sequence[float], sharpness_x_lr: Sequence[float],
                   lambda_min_ratio: Sequence[float] | None = None, limit: float = 2.0,
                   title: str = "Sharpness against the learning rate") -> None:
    """Draw :func:`plot_sharpness`'s panels into a matplotlib ``Figure`` (the report's figures use this)."""
    rows = 2 if lambda_min_ratio is not None else 1
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(list(steps), list(sharpness_x_lr), marker=".", lw=1.2, label="lambda_max x lr")
    ax.axhline(limit, color="crimson", ls="--", lw=1, label=f"stability limit {limit:g}")
    ax.set_ylabel("lambda_max x lr")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if lambda_min_ratio is not None:
        ax2 = axes[1][0]
        ax2.plot(list(steps), list(lambda_min_ratio), marker=".", lw=1.2, color="tab:green")
        ax2.axhline(0.0, color="grey", lw=0.8)
        ax2.set_ylabel("lambda_min / lambda_max")
    axes[-1][0].set_xlabel("step")
