"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Every function takes a :class:`~bpkit.record.RunData`, returns a ``Figure`` or ``None`` when the
run logged nothing it could draw, and never raises on missing keys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bpkit.record import RunData

__all__ = ["FINDING_COLORS", "FINDING_LABELS", "HIST_GROUPS", "UPDATE_RATIO_GUIDE", "all_figures", "clipping",
           "figure", "finish_loss_axes", "gradient_flow", "is_momentum", "learning_rate", "loss", "norm_vs_depth",
           "plain", "ridgelines", "save", "update_ratio"]

UPDATE_RATIO_GUIDE = 1e-3  # the rule of thumb: each step changes a weight by about 1/1000 of its size
HIST_GROUPS = {"grad/hist/": "gradients, log10 |g|", "weight/hist/": "weights, log10 |w|",
               "act/hist/": "activations, value", "act_grad/hist/": "gradients w.r.t. activations, log10 |g|"}


def figure(w: float, h: float) -> Figure:
    """An empty ``w`` x ``h`` inch figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(w, h), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def plain(text: object) -> str:
    """Text from the record (parameter names, metric keys, overrides) as matplotlib shows it literally: every
    ``$`` escaped, so a name such as ``$x^$`` is drawn as typed instead of failing mathtext's parser."""
    return str(text).replace("$", "\\$")


def _short(name: str, width: int = 38) -> str:
    name = name[6:] if name.startswith("model.") else name
    return plain(name if len(name) <= width else "..." + name[-(width - 3):])


def _layers(run: RunData, prefix: str) -> list[str]:
    return [k[len(prefix):] for k in run.keys(prefix)]


def _matrix(run: RunData, prefix: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values[layer, step])`` on the union of logged steps (NaN where a layer was not logged)."""
    steps = np.unique(np.concatenate([run.series(prefix + n)[0] for n in names]))
    col = {int(s): i for i, s in enumerate(steps)}
    out = np.full((len(names), len(steps)), np.nan)
    for r, n in enumerate(names):
        s, v = run.series(prefix + n)
        for si, vi in zip(s.tolist(), v.tolist()):
            out[r, col[si]] = vi
    return steps, out


def _weights_first(names: list[str]) -> list[str]:
    """Without biases when there are weights too: a bias's norm zigzags against its weight's."""
    weights = [n for n in names if not n.endswith("bias")]
    return weights or names


def gradient_flow(run: RunData) -> Figure | None:
    """Heatmap of log10 gradient norm, one row per layer (input at the top), one column per logged step."""
    names = _layers(run, "grad/norm/")
    if not names:
        return None
    steps, norms = _matrix(run, "grad/norm/", names)
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.where(norms > 0, np.log10(norms), np.nan)
    fig = figure(min(14, 6 + 0.1 * len(steps)), min(9, 2 + 0.16 * len(names)))
    ax = fig.add_subplot()
    cmap = _cmap("viridis")
    cmap = cmap.with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(logn), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_title("Gradient flow: log10 gradient norm per layer and step")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (input at the top)")
    stride = max(1, math.ceil(len(names) / 40))
    ax.set_yticks(range(0, len(names), stride), [_short(n) for n in names[::stride]], fontsize=7)
    xt = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    ax.set_xticks(xt, [str(int(steps[i])) for i in xt], fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 ||grad||")
    return fig


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].copy()


def norm_vs_depth(run: RunData, max_steps: int = 4) -> Figure | None:
    """Gradient norm against depth (parameter order) at a few logged steps: first, middle and last."""
    names = _weights_first(_layers(run, "grad/norm/"))
    if not names:
        return None
    steps, norms = _matrix(run, "grad/norm/", names)
    pick = sorted(set(np.linspace(0, len(steps) - 1, min(max_steps, len(steps))).round().astype(int).tolist()))
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    colors = _cmap("plasma")(np.linspace(0.1, 0.85, len(pick)))
    x = np.arange(1, len(names) + 1)
    for c, i in zip(colors, pick):
        y = np.where(norms[:, i] > 0, norms[:, i], np.nan)
        ax.plot(x, y, marker="o", ms=3, color=c, label=f"step {int(steps[i])}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (parameter order: input -> output)")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm versus depth")
    if len(names) <= 16:
        ax.set_xticks(x, [_short(n, 22) for n in names], rotation=60, ha="right", fontsize=7)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def update_ratio(run: RunData) -> Figure | None:
    """``||delta w|| / ||w||`` per layer over steps, with the 1e-3 rule-of-thumb line."""
    names = _layers(run, "update/ratio/")
    if not names:
        return None
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    colors = _cmap("viridis")(np.linspace(0, 0.9, len(names)))
    for c, n in zip(colors, names):
        s, v = run.series("update/ratio/" + n)
        ax.plot(s, np.where(v > 0, v, np.nan), color=c, lw=1, label=_short(n, 30))
    ax.axhline(UPDATE_RATIO_GUIDE, color="crimson", ls="--", lw=1.5, label="1e-3 guide")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("||update|| / ||weight||")
    ax.set_title("Update-to-weight ratio per layer (dark: input side, light: output side)")
    handles, labels = ax.get_legend_handles_labels()
    if len(names) <= 8:
        ax.legend(fontsize=7)
    else:
        ax.legend(handles[-1:], labels[-1:], fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _finite_edges(edges: np.ndarray) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64).copy()
    if len(e) > 2 and not math.isfinite(e[0]):
        e[0] = e[1] - (e[2] - e[1])
    if len(e) > 2 and not math.isfinite(e[-1]):
        e[-1] = e[-2] + (e[-2] - e[-3])
    return e


def ridgelines(run: RunData, prefix: str, max_layers: int = 4, max_steps: int = 10) -> Figure | None:
    """Histograms of a few layers (first, middle, last) stacked over time: later steps drawn higher."""
    keys = _weights_first([k for k in run.histograms if k.startswith(prefix)])
    if not keys:
        return None
    pick = sorted(set(np.linspace(0, len(keys) - 1, min(max_layers, len(keys))).round().astype(int).tolist()))
    keys = [keys[i] for i in pick]
    fig = figure(3.2 * len(keys) + 0.6, 4.6)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        hs = run.histograms[key]
        take = sorted(set(np.linspace(0, len(hs) - 1, min(max_steps, len(hs))).round().astype(int).tolist()))
        colors = _cmap("viridis")(np.linspace(0, 0.9, len(take)))
        for row, (c, i) in enumerate(zip(colors, take)):
            h = hs[i]
            edges = _finite_edges(h.edges)
            centers = (edges[:-1] + edges[1:]) / 2
            total = h.counts.sum()
            dens = h.counts / h.counts.max() if total > 0 and h.counts.max() > 0 else np.zeros_like(h.counts)
            base = row * 0.6
            ax.fill_between(centers, base, base + dens, color=c, alpha=0.75, lw=0)
            ax.plot(centers, base + dens, color="k", lw=0.4)
            ax.text(centers[0], base + 0.05, f"{h.step}", fontsize=6, va="bottom")
        ax.set_yticks([])
        ax.set_title(_short(key[len(prefix):], 30), fontsize=8)
        ax.set_xlabel(HIST_GROUPS.get(prefix, "value"), fontsize=8)
    fig.suptitle(f"{plain(prefix.split('/')[0])} histograms over time (bottom: first logged step, top: last; "
                 "labels: step)", fontsize=9)
    return fig


def clipping(run: RunData) -> Figure | None:
    """Pre- and post-clip gradient norm and the threshold (log scale), and the clipped fraction."""
    keys = run.keys("clip/")
    if not keys:
        return None
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    styles = {"norm_pre": ("tab:blue", "-", "norm before clipping"), "norm_post": ("tab:green", "-", "after"),
              "threshold": ("crimson", "--", "threshold")}
    for key in keys:
        base = key[len("clip/"):].split("/")[0]
        if base in styles:
            s, v = run.series(key)
            c, ls, label = styles[base]
            ax.plot(s, np.where(v > 0, v, np.nan), color=c, ls=ls, lw=1.2, label=plain(f"{label} ({key})"))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    frac = [k for k in keys if k.startswith("clip/clipped")]
    if frac:
        ax2 = ax.twinx()
        for key in frac:
            s, v = run.series(key)
            ax2.bar(s, v, width=max(1.0, 0.8 * float(np.median(np.diff(s))) if len(s) > 1 else 1.0),
                    color="orange", alpha=0.3, label="fraction of steps clipped")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("fraction of steps clipped")
    ax.set_title("Gradient clipping activity")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def is_momentum(key: str) -> bool:
    """A momentum (or Adam beta1) series that LearningRateMonitor logs next to the learning rate."""
    return any(w in key.lower() for w in ("momentum", "beta"))


def learning_rate(run: RunData) -> Figure | None:
    """The learning rate of every param group (the ``lr/*`` series); momentum, when logged, on its own axis."""
    keys = [k for k in run.keys("lr/") if not is_momentum(k)]
    # RunRecord logs momentum as momentum/<group>; LearningRateMonitor (when added) as lr/<opt>-momentum
    moms = [k for k in run.keys("lr/") if is_momentum(k)] + list(run.keys("momentum/"))
    if not keys:
        return None
    fig = figure(8, 3.4)
    ax = fig.add_subplot()
    for key in keys:
        s, v = run.series(key)
        ax.plot(s, v, lw=1.5, label=plain(key))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate" + (" (momentum on the right axis)" if moms else ""))
    vals = np.concatenate([run.series(k)[1] for k in keys])
    if np.all(vals > 0) and vals.max() / max(vals.min(), 1e-300) > 50:
        ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    if moms:
        ax2 = ax.twinx()
        for key in moms:
            s, v = run.series(key)
            ax2.plot(s, v, lw=1.0, ls="--", color="grey", label=plain(key))
        ax2.set_ylabel("momentum")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7)
    ax.grid(True, alpha=0.3)
    return fig


FINDING_COLORS = {"crashed": "black", "nonfinite": "black", "exploding": "purple", "gradcheck": "brown",
                  "vanishing": "darkorange", "dead": "chocolate", "saturated": "goldenrod", "unused": "grey",
                  "spike": "crimson", "clipping": "teal", "stalled": "slategrey"}

FINDING_LABELS = {"nonfinite": "NaN/Inf", "crashed": "crash", "gradcheck": "gradient check", "dead": "dead units",
                  "saturated": "saturated units", "unused": "unused parameters", "vanishing": "vanishing gradients",
                  "exploding": "exploding gradients", "spike": "spike"}


def loss(run: RunData, findings: list[Any] | None = None) -> Figure | None:
    """Training loss (the chosen series, see :func:`bpkit.diagnosis.findings.train_loss_keys`), validation losses,
    the returned losses of the last steps before a crash. NaN/Inf losses are left as a gap, with one marker at the
    first one; each finding's first step is marked once (a dashed line in its colour, named in the legend)."""
    from bpkit.diagnosis.findings import train_loss_keys, val_loss_keys

    train, val = train_loss_keys(run), val_loss_keys(run)
    last = sorted((s, r["loss"]) for s, r in run.last_steps.items() if r.get("loss") is not None)
    if not train and not val and not last:
        return None
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    drawn = []
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    first_bad: list[int] = []
    for i, key in enumerate(train):
        s, v = run.series(key)
        bad = ~np.isfinite(v)
        if bad.any():
            first_bad.append(int(s[bad][0]))
        v = np.where(bad, np.nan, v)
        ax.plot(s, v, color=colors[i % len(colors)], lw=1.2, marker="o" if len(v) < 3 else None, ms=4,
                label=plain(key + (" (returned by training_step)" if key == "loss/train_returned" else "")))
        drawn.append(v)
    for i, key in enumerate(val):
        s, v = run.series(key)
        bad = ~np.isfinite(v)
        if bad.any():
            first_bad.append(int(s[bad][0]))
        ax.plot(s, np.where(bad, np.nan, v), color=["tab:orange", "tab:red", "gold"][i % 3], marker="o", ms=4,
                lw=1.2, label=plain(key))
        drawn.append(v)
    if last:
        s, v = np.asarray([x for x, _ in last]), np.asarray([y for _, y in last], dtype=np.float64)
        ax.plot(s, np.where(np.isfinite(v), v, np.nan), color="black", marker="x", ms=6, lw=0.8, ls="--",
                label="last steps before the crash")
        drawn.append(v)
    finish_loss_axes(ax, drawn, "loss", "Loss (dashed lines: where each finding starts)")
    all_steps = [run.series(k)[0] for k in train + val if len(run.series(k)[0])]
    if all_steps:  # NaN values do not count in autoscaling: keep the gap after the last finite value visible
        lo, hi = min(int(s.min()) for s in all_steps), max(int(s.max()) for s in all_steps)
        if hi > lo:
            pad = 0.02 * (hi - lo)
            ax.set_xlim(min(ax.get_xlim()[0], lo - pad), max(ax.get_xlim()[1], hi + pad))
    marks: dict[int, list[str]] = {}
    for f in findings or []:
        if f.steps is None or f.steps[0] < 0 or f.kind == "stalled":
            continue
        marks.setdefault(int(f.steps[0]), []).append(f.kind)
    nan_at = min(first_bad) if first_bad else None
    if nan_at is not None:
        ax.plot([nan_at], [0.98], transform=ax.get_xaxis_transform(), marker="v", ms=11, color="black", ls="none",
                label=f"first NaN/Inf loss (step {nan_at}); gaps: non-finite", clip_on=False)
    for step, kinds in sorted(marks.items()):
        c = FINDING_COLORS.get(kinds[0], "grey")
        names = ", ".join(FINDING_LABELS.get(k, k) for k in kinds)
        ax.axvline(step, color=c, ls="--", lw=1.1, label=plain(f"{names} from step {step}"))
    mark_unfreezing(ax, run)
    ax.legend(fontsize=7)
    return fig


def mark_unfreezing(ax: Any, run: RunData) -> None:
    """A dotted line at each step where fine-tuning unfroze layers (the record's ``unfreeze`` entries), labelled with
    the blocks."""
    for step, data in run.events.get("unfreeze", []):
        blocks = data.get("blocks") or []
        ax.axvline(step, color="teal", ls=":", lw=1.3,
                   label=plain(f"unfrozen at step {step}: {', '.join(map(str, blocks[:3]))}"
                               f"{' ...' if len(blocks) > 3 else ''}"))


def temporal(run: RunData) -> Figure | None:
    """The heatmap of :func:`bpkit.probe.temporal.plot_heatmap` from the record's ``temporal`` entries."""
    entries = run.events.get("temporal", [])
    if not entries:
        return None
    from bpkit.probe.temporal import plot_heatmap

    return plot_heatmap([{"type": "temporal", "step": s, "data": d} for s, d in entries])


def drift(run: RunData) -> Figure | None:
    """``drift/<block>`` over the steps: how far fine-tuning moved each block from its pretrained weights."""
    keys = [k for k in run.keys("drift/") if k != "drift/trainable_blocks"]
    if not keys:
        return None
    fig = figure(8, 3.6)
    ax = fig.add_subplot()
    for key in keys:
        s, v = run.series(key)
        ax.plot(s, v, lw=1.2, label=plain(key[len("drift/"):]))
    mark_unfreezing(ax, run)
    ax.set_xlabel("step")
    ax.set_ylabel("||w - w_pretrained|| / ||w_pretrained||")
    ax.set_title("Drift from the pretrained weights, per block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def finish_loss_axes(ax: Any, series: list[np.ndarray], ylabel: str, title: str) -> None:
    """Log scale when the finite values span more than two decades; labels, legend, grid."""
    finite = np.concatenate([np.asarray(v)[np.isfinite(v)] for v in series]) if series else np.zeros(0)
    if len(finite) and np.all(finite > 0) and finite.max() / finite.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def curvature(run: RunData) -> Figure | None:
    """``curvature/sharpness_x_lr`` over the steps against 2, and ``lambda_min / lambda_max``."""
    from bpkit.curvature.plots import draw_sharpness

    steps, sharp = run.series("curvature/sharpness_x_lr")
    if not len(sharp) or not np.isfinite(sharp).any():
        return None
    s_min, lam_min = run.series("curvature/lambda_min")
    s_max, lam_max = run.series("curvature/lambda_max")
    ratio = None
    if len(lam_min) == len(steps) and len(lam_max) == len(steps) and np.array_equal(s_min, steps) \
            and np.array_equal(s_max, steps):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.abs(lam_max) > 0, lam_min / np.abs(lam_max), np.nan)
    fig = figure(8, 3.2 if ratio is None else 5.6)
    draw_sharpness(fig, steps, sharp, ratio)
    return fig


def all_figures(run: RunData, findings: list[Any] | None = None) -> list[tuple[str, str, Figure]]:
    """``[(file stem, caption, figure)]`` for everything the run logged, in report order; ``findings`` (from
    :func:`bpkit.diagnosis.findings.diagnose`) are marked on the loss plot."""
    out: list[tuple[str, str, Figure | None]] = [
        ("loss", "Loss curve; a dashed line marks where each finding starts; a NaN/Inf loss is left as a gap, its "
                 "first step marked with a triangle.", loss(run, findings)),
        ("gradient_flow", "Gradient flow: log10 of each layer's gradient norm (rows, input at the top) at every "
                          "logged step (columns). A dark band at the top that stays dark is a vanishing gradient; "
                          "a bright column is an exploding step. Grey: not logged or zero.", gradient_flow(run)),
        ("norm_vs_depth", "Gradient norm against depth at a few steps: a healthy network keeps it roughly flat; "
                          "a slope down towards the input is a vanishing gradient.", norm_vs_depth(run)),
        ("update_ratio", "Update-to-weight ratio per layer; around 1e-3 (dashed) is the rule of thumb. Far above: "
                         "the learning rate is too high for that layer; far below: it barely learns.",
         update_ratio(run)),
    ]
    for prefix, what in HIST_GROUPS.items():
        out.append((prefix.split("/")[0] + "_hist", f"Histograms of {what} over time for a few layers.",
                    ridgelines(run, prefix)))
    out += [("clipping", "Gradient clipping: norm before and after, threshold, and the fraction of steps clipped.",
             clipping(run)),
            ("temporal", "Gradient through time (TemporalGradientMonitor): log10 of the gradient reaching each time step "
                         "of the sequence module's input, relative to the last step (x: steps back, y: training step). "
                         "Dark on the left: the gradient vanishes before it reaches the early steps (a short memory "
                         "horizon); bright on the left: it explodes going back.", temporal(run)),
            ("drift", "Fine-tuning: how far each block moved from its pretrained weights (WeightDrift); dotted lines: "
                      "where layers were unfrozen.", drift(run)),
            ("curvature", "Curvature (CurvatureMonitor): lambda_max x lr against the stability limit 2 of gradient "
                          "descent (above it the step overshoots along the sharpest direction; full-batch training "
                          "hovers around it at the edge of stability), and lambda_min / lambda_max (below 0: "
                          "negative curvature, a saddle when the gradient is small).", curvature(run)),
            ("lr", "Learning rate of each parameter group.", learning_rate(run))]
    return [(stem, cap, fig) for stem, cap, fig in out if fig is not None]
