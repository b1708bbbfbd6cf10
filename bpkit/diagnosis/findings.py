"""Findings: a run's alerts and statistics turned into plain words, with evidence and ranked remedies.

Pure Python and numpy over a :class:`bpkit.record.RunData`: ``bpkit-report`` and, at the end of fit,
:class:`bpkit.callbacks.RunRecord` (``wandb.alert``) both diagnose a run with it. Alerts whose ``where`` is a
reserved name (:data:`bpkit.record.RESERVED_WHERE`: the total gradient norm, the loss, the batch) are never
counted as layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bpkit.record import RETURNED_LOSS_KEY, RunData, is_reserved_where

__all__ = ["CONSEQUENCES", "Finding", "NO_PROBLEMS", "NO_STATISTICS", "ORDER", "RETURNED_LOSS", "STAT_PREFIXES",
           "TITLES", "accuracy_keys", "chance_accuracy", "count_span", "cut", "describe_layers", "diagnose",
           "has_statistics", "last_steps_table", "no_statistics_note", "plural", "root_findings", "summary_line",
           "train_loss_keys", "val_loss_keys"]

TITLES = {
    "crashed": "The run crashed",
    "nonfinite": "NaN/Inf gradients or loss",
    "exploding": "Exploding gradients",
    "gradcheck": "Gradient check failed: a backward pass is wrong",
    "vanishing": "Vanishing gradients",
    "dead": "Dead units",
    "saturated": "Saturated units",
    "unused": "Unused parameters",
    "spike": "Loss or gradient-norm spikes",
    "sharpness": "The learning rate is too large for the loss surface",
    "clipping": "Gradient clipping acts on most steps",
    "stalled": "The loss is not going down",
    "saddle": "A saddle point: small gradient, negative curvature",
}
ORDER = list(TITLES)  # most urgent first


@dataclass
class Finding:
    """One problem of a run.

    Attributes:
        kind: ``crashed``, ``stalled`` or an alert kind (``vanishing``, ``exploding``, ...).
        title: a short heading.
        summary: one or two plain sentences: what, where, since when.
        evidence: measured facts (layers, steps, values) supporting it.
        remedies: what to try, most promising first.
        where: the affected parameter or module names.
        steps: ``(first, last)`` optimizer step at which it was seen.
        after: the step of the first NaN/Inf when this finding is a consequence of it (vanishing, dead units, a
            stalled or exploding loss seen after the run became non-finite): it is shown under the NaN finding,
            not as a problem of its own; ``None`` for a root problem.
    """

    kind: str
    title: str
    summary: str
    evidence: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    steps: tuple[int, int] | None = None
    after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The finding as plain text (console, ``wandb.alert``)."""
        head = f"After the NaN at step {self.after}: " if self.after is not None else ""
        lines = [f"{head}{self.title}: {self.summary}"]
        lines += [f"  - {e}" for e in self.evidence]
        lines += [f"  {i}. {r}" for i, r in enumerate(self.remedies, 1)]
        return "\n".join(lines)


RETURNED_LOSS = RETURNED_LOSS_KEY  # the loss training_step returned (RunRecord)
_STAT_PREFIXES = ("grad/", "weight/", "update/", "act/", "act_grad/", "clip/", "lr/", "curvature/", "noise/", "time/",
                  "drift/", "report/")
_VAL_WORDS = ("val", "valid", "validation", "eval")


def _tokens(key: str) -> list[str]:
    return [t for t in re.split(r"[/_.\-\s]+", key.lower()) if t]


def _is_loss(key: str) -> bool:
    return "loss" in _tokens(key) and not key.startswith(_STAT_PREFIXES)


def train_loss_keys(run: RunData) -> list[str]:
    """The training-loss series the report draws and judges, best first: ``train/loss`` when it was logged; else
    every other logged name that looks like a training loss (``train_loss``, ``loss``, ``d_loss``/``g_loss``,
    ...: a ``loss`` word, not a validation or test metric); else the loss ``training_step`` returned
    (``loss/train_returned``, written by RunRecord). Empty when the run recorded no loss."""
    if len(run.series("train/loss")[1]):
        return ["train/loss"]
    logged = [k for k in run.scalars if k != RETURNED_LOSS and _is_loss(k) and _tokens(k)[0] not in _VAL_WORDS
              and _tokens(k)[0] != "test" and len(run.series(k)[1])]
    if logged:
        return logged
    return [RETURNED_LOSS] if len(run.series(RETURNED_LOSS)[1]) else []


def val_loss_keys(run: RunData) -> list[str]:
    """Validation losses (``val/loss``, ``val_loss``, ``valid_loss``, ...), drawn as a second curve."""
    return [k for k in run.scalars if _is_loss(k) and _tokens(k)[0] in _VAL_WORDS and len(run.series(k)[1])]


STAT_PREFIXES = ("grad/", "act/", "weight/", "update/", "act_grad/")


def has_statistics(run: RunData) -> bool:
    """Did any monitor record gradient or activation statistics (scalars or histograms)?"""
    return bool(run.histograms) or any(k.startswith(STAT_PREFIXES) for k in run.scalars)


def no_statistics_note(run: RunData) -> str | None:
    """The plain sentence that replaces "No problems found" when the record holds no statistics; ``None`` when it
    holds some."""
    if has_statistics(run):
        return None
    every = run.meta.get("log_every_n_steps")
    steps = [int(s[-1]) for s, _ in run.scalars.values() if len(s)]
    end = run.meta.get("end_step")
    last = max(steps + ([end] if isinstance(end, int) and not isinstance(end, bool) else []), default=None)
    if every == 0:
        why = "log_every_n_steps=0: no periodic logging"
    elif isinstance(every, int) and not isinstance(every, bool) and every > 0 and (last is None or last + 1 < every):
        why = f"the run ended before its first log step (log_every_n_steps={every})"
    else:
        why = "log_every_n_steps=0 / the run ended before its first log step / no GradientMonitor or " \
              "ActivationMonitor among the callbacks"
    return f"bpkit saw no gradient or activation statistics ({why}); no problems can be ruled out."


def _split_names(where: str) -> list[str]:
    return [w.strip() for w in str(where).split(",") if w.strip()]


def _layer_names(names: list[str]) -> list[str]:
    """``names`` without the reserved ``where`` names (the total gradient norm, the loss, the batch): the
    parameters and modules among them."""
    return [n for n in names if not is_reserved_where(n)]


def _layer_order(run: RunData) -> list[str]:
    """Parameter names in model order, as GradientMonitor logged them."""
    return [k[len("grad/norm/"):] for k in run.keys("grad/norm/")]


def _ranges(idx: list[int]) -> str:
    idx = sorted(set(idx))
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("bias")


def describe_layers(names: list[str], order: list[str]) -> str:
    """``"layers 1-6 of 21 (model.blocks.0.linear.weight ... model.blocks.5.linear.weight)"``; when only
    weights are named, biases are not counted as layers."""
    if not names:
        return "no layer named"
    if not any(_is_bias(n) for n in names):
        order = [n for n in order if not _is_bias(n)]
    shown = names if len(names) <= 4 else [names[0], names[1], "...", names[-1]]
    listing = ", ".join(shown)
    pos = [order.index(n) + 1 for n in names if n in order]
    if order and len(pos) == len(names):
        return f"layers {_ranges(pos)} of {len(order)} ({listing})"
    return f"{len(names)} layer{'s' if len(names) != 1 else ''} ({listing})"


def _model_has(run: RunData, *words: str) -> bool:
    acts = " ".join(str(a) for a in run.meta.get("activations", [])).lower()
    names = " ".join(_layer_order(run) + [a.get("where", "") for a in run.alerts]).lower()
    model = str(run.meta.get("model", "")).lower()
    return any(w in acts or w in names or w in model for w in words)


def _is_rnn(run: RunData) -> bool:
    return _model_has(run, "weight_hh", "rnn", "lstm", "gru")


def _steps(alerts: list[dict[str, Any]]) -> tuple[int, int]:
    s = [_int(a.get("step", 0), 0) for a in alerts]
    return min(s), max(s)


def plural(n: int, word: str) -> str:
    """``"1 alert"``, ``"3 alerts"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def count_span(n: int, what: str, first: int, last: int) -> str:
    """``"1 vanishing alert at step 10"``, ``"5 vanishing alerts between steps 10 and 50"``."""
    at = f"at step {first}" if first == last else f"between steps {first} and {last}"
    return f"{plural(n, what)} {at}"


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis when it was longer."""
    text = str(text)
    return text if len(text) <= width else text[:width - 1].rstrip() + "\u2026"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _last_values(run: RunData, prefix: str, names: list[str]) -> dict[str, float]:
    out = {}
    for n in names:
        v = run.last(prefix + n)
        if v is not None:
            out[n] = v
    return out


# ------------------------------------------------------------------ one builder per kind

def _vanishing(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    order = _layer_order(run)
    names = _ordered_union(alerts, order)
    first, last = _steps(alerts)
    worst = min(_float(a.get("value")) for a in alerts)
    share = "no gradient at all" if worst <= 0 else f"about {worst:.0e} of the gradient of the most-trained layer"
    summary = f"{describe_layers(names, order)} get {share}, first seen at step {first}: these layers barely learn."
    evidence = [f"{count_span(len(alerts), 'vanishing alert', first, last)}; the lowest gradient norm was "
                f"{worst:.1e} of the largest"]
    norms = _last_values(run, "grad/norm/", order)
    finite = {n: v for n, v in norms.items() if math.isfinite(v) and v > 0}
    if finite:
        top = max(finite, key=finite.get)
        steps, _ = run.series("grad/norm/" + top)
        low = [n for n in names if n in finite]
        if low:
            lo_n = min(low, key=finite.get)
            evidence.append(f"at step {int(steps[-1])} (last log) the gradient norm of {lo_n} is {finite[lo_n]:.2e} "
                            f"against {finite[top]:.2e} for {top} (ratio {finite[lo_n] / finite[top]:.1e})")
        profile = [math.log10(finite[n] / finite[top]) for n in order if n in finite and not _is_bias(n)] or \
                  [math.log10(v / finite[top]) for v in finite.values()]
        evidence.append("log10 of each weight's gradient norm over the largest, input to output: ["
                        + ", ".join(f"{p:.1f}" for p in profile) + "]")
    sat = [a for a in run.alerts if a.get("kind") == "saturated"]
    if sat:
        evidence.append(f"saturated units were also found ({cut(', '.join(_ordered_union(sat, [])), 160)}): "
                        "saturating activations pass almost no gradient")
    remedies = []
    relu = "Replace sigmoid/tanh with a ReLU-family activation (ReLU, LeakyReLU, GELU): its derivative is 1 where " \
           "active, so the gradient does not shrink by up to 4x per layer."
    init = "Use He (Kaiming) initialization for ReLU-family layers, Xavier/Glorot for tanh/sigmoid, so every layer " \
           "keeps the gradient's scale."
    norm = "Add normalization (batch norm or layer norm) between layers to keep activations in the range where " \
           "the activation's derivative is large."
    res = "Add residual (skip) connections: the gradient then has a short path to the first layers."
    lstm = "For a recurrent model, use an LSTM or GRU (gated cells keep the gradient through time), or shorter " \
           "truncated-BPTT windows."
    if any(a.get("kind") == "dead" for a in run.alerts):
        remedies.append("Dead units (see below) pass exactly zero gradient: fix them first.")
    if _is_rnn(run):
        remedies.append(lstm)
    if _model_has(run, "sigmoid", "tanh") or sat or not run.meta.get("activations"):
        remedies += [relu, init]
    else:
        remedies += [init, "Try LeakyReLU or GELU: unlike ReLU their gradient is never exactly zero."]
    remedies += [norm, res]
    return Finding("vanishing", TITLES["vanishing"], summary, evidence, remedies, names, (first, last))


def _exploding(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    order = _layer_order(run)
    names = _layer_names(_ordered_union(alerts, order))
    first, last = _steps(alerts)
    peak = max(_float(a.get("value")) for a in alerts)
    thr = _float(alerts[0].get("threshold"))
    where = f"; growing fastest in {describe_layers(names, order)}" if names else ""
    summary = f"the total gradient norm jumped to {_fmt(peak)} (threshold {_fmt(thr)}) from step {first}{where}."
    evidence = [count_span(len(alerts), "exploding alert", first, last)]
    steps, values = run.series("grad/norm_total")
    ok = np.isfinite(values)
    if ok.any():
        i = int(np.nanargmax(np.where(ok, values, -np.inf)))
        evidence.append(f"logged total gradient norm: median {np.median(values[ok]):.3g}, largest {values[i]:.3g} "
                        f"at step {int(steps[i])}")
    _, clipped = run.series("clip/clipped")
    if len(clipped):
        evidence.append(f"gradient clipping was on: {100 * np.nanmean(clipped):.0f}% of steps clipped")
    remedies = ["Clip gradients: GradientClipping('norm', max_norm=1.0), or the adaptive 'zclip'/'autoclip' policies "
                "that follow the norm's own history."]
    lr = "Lower the learning rate, or add a warm-up (scheduler=warmup_cosine)."
    if len(clipped):
        remedies.insert(0, lr)
    else:
        remedies.append(lr)
    if _is_rnn(run):
        remedies.append("Keep the recurrent weight matrix's spectral radius <= 1 (orthogonal init: "
                        "RNN(init='orthogonal')), or use an LSTM/GRU.")
    remedies.append("Add normalization (layer norm) to bound the activations that multiply the gradient.")
    return Finding("exploding", TITLES["exploding"], summary, evidence, remedies, names, (first, last))


def _nonfinite(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    order = _layer_order(run)
    loss_names = {*train_loss_keys(run), RETURNED_LOSS}
    names = [n for n in _layer_names(_ordered_union(alerts, order)) if n not in loss_names]
    first, last = _steps(alerts) if alerts else (-1, -1)
    where = f" in {describe_layers(names, order)}" if names else ""
    summary = f"gradients or the loss became NaN/Inf{where}, first at step {first}."
    evidence = [count_span(len(alerts), "non-finite alert", first, last)] if alerts else []
    decided = bool(alerts)
    for key in _loss_keys_checked(run):
        loss_steps, loss = run.series(key)
        bad = ~np.isfinite(loss)
        if bad.any():
            evidence.append(f"{key} is non-finite at {int(bad.sum())} of {len(loss)} logged steps, first at step "
                            f"{int(loss_steps[bad][0])}")
            if not decided:  # no alert: the first series found decides the summary
                decided, first = True, int(loss_steps[bad][0])
                last = first
                summary = f"the training loss ({key}) became NaN/Inf at step {first}."
    skipped = run.last("grad/skipped_steps")
    if skipped:
        evidence.append(f"GradientMonitor skipped {plural(int(skipped), 'update')} with non-finite gradients")
    origin = next((str(a["origin"]) for a in alerts if a.get("origin")), None)
    if origin:
        summary += f" It starts in {origin}."
        evidence.insert(0, f"replaying step {first} with hooks on every module: the first non-finite value appears in "
                           f"{origin}")
    remedies = ([f"Fix `{origin.split(' ')[0]}` first: a log, sqrt, pow or division there meets 0 (or a negative "
                 "number) on those samples; move an epsilon inside the square root, clamp the argument, or drop blank "
                 "records."] if origin else []) + ["Lower the learning rate (the usual cause: one too large update overflows).",
                "Clip gradients (GradientClipping('norm') or 'skip' to drop outlier steps).",
                "Check the loss for log(0) or a division by zero: use logit-based losses (cross_entropy, "
                "BCEWithLogits) rather than log(softmax) or log(sigmoid) by hand.",
                "With mixed precision, prefer bf16 or keep the GradScaler; keep GradientMonitor(on_nonfinite='skip') "
                "so a bad step does not corrupt the weights."]
    return Finding("nonfinite", TITLES["nonfinite"], summary, evidence, remedies, names, (first, last))


def _spike(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    first, last = _steps(alerts)
    what = sorted({str(a.get("where", "")) for a in alerts})
    at = ", ".join(f"step {int(a['step'])} ({a.get('where')} {_fmt(_float(a.get('value')))})" for a in alerts[:6])
    jumps = " and ".join(w.replace("_", " ") for w in what)
    summary = f"{plural(len(alerts), 'sudden jump')} of {jumps}, first at step {first}."
    evidence = [f"spikes at {at}{' ...' if len(alerts) > 6 else ''}"]
    remedies = ["Clip adaptively: GradientClipping('zclip') or skip outlier steps (GradientClipping('skip')).",
                "Lower the learning rate or add a warm-up.",
                "Look at the batches of those steps: a mislabeled or extreme batch spikes the loss.",
                "With Adam, a larger epsilon or a higher beta2 damps rare large updates."]
    return Finding("spike", TITLES["spike"], summary, evidence, remedies, [], (first, last))


def _sharpness(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    first, last = _steps(alerts)
    steps, values = run.series("curvature/sharpness_x_lr")
    peak = max(_float(a.get("value")) for a in alerts)
    summary = (f"the curvature of the loss times the learning rate (lambda_max x lr) reached {_fmt(peak)}, above the "
               f"stability limit 2 of gradient descent, first at step {first}: steps overshoot along the sharpest "
               "direction, so the loss oscillates or diverges.")
    evidence = [count_span(len(alerts), "sharpness alert", first, last)]
    if len(values):
        ok = np.isfinite(values)
        above = int((values[ok] > 2).sum())
        evidence.append(f"curvature/sharpness_x_lr: {above} of {int(ok.sum())} measurements above 2, last "
                        f"{_fmt(values[ok][-1]) if ok.any() else 'n/a'} at step {int(steps[ok][-1]) if ok.any() else -1}")
    lam = run.series("curvature/lambda_max")[1]
    if len(lam) and np.isfinite(lam).any():
        evidence.append(f"curvature/lambda_max: largest {_fmt(float(np.nanmax(lam)))}")
    remedies = ["Lower the learning rate below 2/lambda_max (the alert says the value), or add a warm-up so the "
                "sharpness settles before the learning rate peaks.",
                "A value that hovers around 2 while the loss keeps going down is the edge of stability (Cohen et al. "
                "2021): full-batch gradient descent drives the sharpness to 2/lr by itself; act only if the loss "
                "oscillates or grows."]
    return Finding("sharpness", TITLES["sharpness"], summary, evidence, remedies, [], (first, last))


def _saddle(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    first, last = _steps(alerts)
    worst = min(_float(a.get("value")) for a in alerts)
    summary = (f"the gradient is small while the loss surface curves down in some direction (lambda_min down to "
               f"{_fmt(worst)}), first at step {first}: training sits near a saddle point, where plain gradient descent "
               "moves away only slowly.")
    evidence = [count_span(len(alerts), "saddle alert", first, last)]
    remedies = ["Use momentum (SGD momentum=0.9, or Adam): it escapes along the negative-curvature direction much "
                "faster.",
                "Add noise: a smaller batch, or a short learning-rate bump.",
                "Initialise at a larger scale (a deep linear or tanh net from a tiny init starts at a saddle)."]
    return Finding("saddle", TITLES["saddle"], summary, evidence, remedies, [], (first, last))


def _units(run: RunData, alerts: list[dict[str, Any]], kind: str) -> Finding:
    names = _ordered_union(alerts, [k[len(f"act/{kind}_frac/"):] for k in run.keys(f"act/{kind}_frac/")])
    first, last = _steps(alerts)
    fracs = _last_values(run, f"act/{kind}_frac/", names)
    listing = ", ".join(f"{n} ({100 * fracs[n]:.0f}%)" if n in fracs else n for n in names[:8])
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    if kind == "dead":
        summary = (f"units that output exactly zero for every sample, so they pass no gradient, in {len(names)} "
                   f"module(s): {listing}{more}; first seen at step {first}.")
        remedies = ["Use LeakyReLU or GELU: their gradient is never exactly zero.",
                    "Use He (Kaiming) initialization and zero (not negative) biases so units start active.",
                    "Lower the learning rate: a large update can push a unit's bias where it never fires again.",
                    "Put normalization (batch norm) before the activation."]
    else:
        summary = (f"tanh/sigmoid outputs pinned near their limits, where the derivative is almost zero, in "
                   f"{len(names)} module(s): {listing}{more}; first seen at step {first}.")
        remedies = ["Use smaller initial weights: Xavier/Glorot initialization.",
                    "Normalize the inputs and add normalization (batch/layer norm) before the activation.",
                    "Replace the saturating activation with a ReLU-family one (ReLU, LeakyReLU, GELU)."]
    evidence = [f"{count_span(len(alerts), kind + ' alert', first, last)}; worst fraction "
                f"{100 * max(_float(a.get('value')) for a in alerts):.0f}% (threshold "
                f"{100 * _float(alerts[0].get('threshold')):.0f}%)"]
    return Finding(kind, TITLES[kind], summary, evidence, remedies, names, (first, last))


def _gradcheck(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    failed: list[str] = []
    evidence = []
    for step, rep in run.gradchecks:
        for p in rep.get("params", []):
            if not p.get("passed", True) and not p.get("inconclusive"):  # float32 noise is not a failure
                failed.append(p.get("name", "?"))
                evidence.append(f"step {step}: {p.get('name')} relative error {_fmt(_float(p.get('rel_error')))} "
                                f"(rtol {_fmt(_float(rep.get('rtol')))}){': ' + p['reason'] if p.get('reason') else ''}")
        bi = rep.get("batch_independence")
        if bi and not bi.get("passed", True):
            where = f"; it happens {bi['origin']}" if bi.get("origin") else ""
            evidence.append(f"step {step}: the batch-independence check failed: something mixes samples{where}")
    for a in alerts:
        failed += [n for n in _layer_names(_split_names(a.get("where", ""))) if n not in failed]
    failed = list(dict.fromkeys(failed))
    steps = _steps(alerts) if alerts else (run.gradchecks[0][0], run.gradchecks[-1][0])
    summary = (f"autograd's gradient disagrees with finite differences for {len(failed)} tensor(s)"
               f"{': ' + ', '.join(failed[:6]) if failed else ''}.")
    remedies = ["Check the backward of any custom torch.autograd.Function (or hook) feeding these tensors against "
                "torch.autograd.gradcheck in float64.",
                "Look for in-place operations on tensors saved for backward and for detach()/no_grad on the "
                "forward path.",
                "If only float32 fails, re-run the check in float64 (GradientCheck(dtype='float64'))."]
    if any("batch-independence" in e for e in evidence):
        remedies.insert(0, "A view/reshape that should be a transpose/permute, or a reduction over the batch, mixes "
                           "samples: fix it first.")
    return Finding("gradcheck", TITLES["gradcheck"], summary, evidence, remedies, failed, steps)


def _loss_keys_checked(run: RunData) -> list[str]:
    """The chosen training-loss series and the returned loss: a NaN in any of them is a NaN loss."""
    keys = train_loss_keys(run)
    return keys + ([RETURNED_LOSS] if RETURNED_LOSS not in keys and len(run.series(RETURNED_LOSS)[1]) else [])


def _int(v: Any, default: int = -1) -> int:
    if isinstance(v, bool):
        return default
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return default
    return int(f) if math.isfinite(f) else default


def last_steps_table(run: RunData, end: int | None = None, n: int = 8) -> list[dict[str, Any]]:
    """What the last steps before the end looked like: ``[{"step", "loss", "grad_norm_total", "nonfinite", "lr"}]``
    from the ``last_steps`` entries written on an exception, else from the last logged values (at most ``n``)."""
    rows: dict[int, dict[str, Any]] = {s: dict(r) for s, r in run.last_steps.items()}
    if not rows:
        keys = _loss_keys_checked(run)[:1] + ["grad/norm_total"]
        for key in keys:
            steps, values = run.series(key)
            for s, v in zip(steps.tolist(), values.tolist()):
                if end is None or s <= end:
                    rows.setdefault(int(s), {})["grad_norm_total" if key == "grad/norm_total" else "loss"] = v
    lr_keys = run.keys("lr/")
    if lr_keys:
        steps, values = run.series(lr_keys[0])
        for s in rows:
            before = values[steps <= s]
            if len(before):
                rows[s].setdefault("lr", float(before[-1]))
    return [{"step": s, **rows[s]} for s in sorted(rows)[-n:]]


def _describe_row(row: dict[str, Any]) -> str:
    parts = []
    if row.get("loss") is not None:
        parts.append(f"loss {_fmt(_float(row['loss']))}")
    if row.get("grad_norm_total") is not None:
        parts.append(f"grad norm {_fmt(_float(row['grad_norm_total']))}")
    if row.get("nonfinite"):
        parts.append("non-finite gradients")
    return f"step {row['step']}: " + (", ".join(parts) or "nothing recorded")


def _crashed(run: RunData) -> Finding:
    error = str(run.meta.get("error") or run.last_steps_error or "unknown error")
    step = _int(run.meta.get("end_step", run.meta.get("step", -1)))
    rows = last_steps_table(run, end=step if step >= 0 else None)
    summary = f"the run stopped with {error[:300]} at step {step}"
    if rows:
        summary += "; the last steps: " + "; ".join(_describe_row(r) for r in rows[-3:])
    summary += "."
    evidence = [f"end status written by RunRecord: crashed at step {step}"] if run.meta.get("status") == "crashed" \
        else ["no end entry: the record's last_steps entry names the exception"]
    source = "buffered since the last log step, written on the exception" if run.last_steps else "last logged values"
    evidence += [_describe_row(r) + (f", lr {_fmt(_float(r['lr']))}" if r.get("lr") is not None else "")
                 + f" ({source})" for r in rows]
    remedies = ["Read the traceback in the run's log (train.log / the console)."]
    losses = [_float(r.get("loss")) for r in rows if r.get("loss") is not None]
    nonfinite = any(r.get("nonfinite") for r in rows) or re.search(r"\b(nan|inf|infinity)\b", error.lower())
    if any(not math.isfinite(v) for v in losses) or nonfinite:
        remedies.append("The loss or the gradients became NaN/Inf before the crash: lower the learning rate, clip "
                        "gradients, and check the loss for log(0) or a division by zero.")
    remedies.append("Resume from the last checkpoint once fixed (ckpt_path='last').")
    return Finding("crashed", TITLES["crashed"], summary, evidence, remedies, [], (step, step))


def _stalled_one(run: RunData, key: str, min_points: int = 4) -> tuple[float, float, int, np.ndarray] | None:
    """``(head, tail, q, steps)`` when the finite values of ``key`` do not go down (the mean of the last quarter
    is above 97% of the first quarter's), judged on at least ``min_points`` logged values; else ``None``."""
    steps, loss = run.series(key)
    ok = np.isfinite(loss)
    steps, loss = steps[ok], loss[ok]
    if len(loss) < max(2, min_points):
        return None
    q = max(1 if len(loss) < 8 else 2, len(loss) // 4)
    head, tail = float(np.mean(loss[:q])), float(np.mean(loss[-q:]))
    if not (tail > 0.97 * head):
        return None
    return head, tail, q, steps


def accuracy_keys(run: RunData) -> list[str]:
    """Validation accuracies (``val/acc``, ``val_accuracy``, ...), best first."""
    keys = [k for k in run.scalars if _tokens(k)[0] in _VAL_WORDS and
            any(t in ("acc", "accuracy") for t in _tokens(k)) and len(run.series(k)[1])]
    return sorted(keys, key=lambda k: (k != "val/acc", k))


def _num_classes(run: RunData) -> int | None:
    n = run.meta.get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None


def chance_accuracy(run: RunData) -> tuple[str, float, float, str] | None:
    """``(key, accuracy, chance, how)`` when the last validation accuracy is at chance level: at most 1.5x of
    ``1/num_classes`` when the record names the number of classes (``num_classes`` in a ``run`` entry); else when
    the last training loss is about ``ln k`` (what cross-entropy gives for uniform guesses over ``k`` classes) and
    the accuracy at most 1.5x of ``1/k``."""
    keys = accuracy_keys(run)
    if not keys:
        return None
    key = keys[0]
    values = run.series(key)[1]
    acc = float(values[np.isfinite(values)][-1]) if np.isfinite(values).any() else math.nan
    if not (0 <= acc <= 1):
        return None
    n = _num_classes(run)
    if n is not None:
        chance = 1.0 / n
        return (key, acc, chance, f"{n} classes in the record") if acc <= 1.5 * chance else None
    for lk in train_loss_keys(run):  # cross-entropy of uniform guesses over k classes is ln(k)
        lv = run.series(lk)[1]
        lv = lv[np.isfinite(lv)]
        if not len(lv) or not 0.6 < float(lv[-1]) < 12:
            continue
        k = round(math.exp(float(lv[-1])))
        if k >= 2 and abs(float(lv[-1]) - math.log(k)) <= 0.1 * math.log(k) and acc <= 1.5 / k:
            return key, acc, 1.0 / k, f"{k} classes inferred: the loss {float(lv[-1]):.3g} is about ln({k})"
    return None


def _stalled(run: RunData) -> Finding | None:
    """The loss is not going down, or the model is not learning: judged on the chosen training-loss series (with
    several, a GAN's ``d_loss`` and ``g_loss``, only when none of them goes down) from 4 logged values on; and
    on a run of any length when the validation accuracy is at chance level (:func:`chance_accuracy`) and the loss
    does not go down (2 logged values suffice) or is not logged."""
    keys = train_loss_keys(run)
    chance = chance_accuracy(run)
    found = [(k, _stalled_one(run, k, 2 if chance else 4)) for k in keys]
    flat = bool(found) and all(r is not None for _, r in found)
    if not flat and not (chance and not keys):
        return None
    evidence = [f"mean {k} of the first {plural(r[2], 'log')} {r[0]:.4g}, of the last {plural(r[2], 'log')} "
                f"{r[1]:.4g}" for k, r in found if r is not None]
    if chance:
        key, acc, level, how = chance
        evidence.insert(0, f"{key} is {acc:.3g} at the last validation: chance level is {level:.3g} ({how})")
    if found and flat:
        key, (head, tail, q, steps) = found[0]
        trend = "grew" if tail > 2 * head else "went"
        name = "the training loss" if key == "train/loss" else f"the training loss ({', '.join(keys)})"
        summary = (f"{name} {trend} from {head:.4g} (first logs) to {tail:.4g} (last logs) over "
                   f"{int(steps[-1] - steps[0])} steps")
        span = (int(steps[0]), int(steps[-1]))
    else:
        steps = run.series(chance[0])[0]
        summary, span = "no training loss was logged", (int(steps[0]), int(steps[-1]))
    if chance:
        summary += f", and {chance[0]} is {chance[1]:.3g}, chance level: the model is not learning."
    else:
        summary += ": the model is not learning."
    remedies = ["Find a working learning rate with the LR range test (bpkit-train lr_find=true).",
                "If the gradients vanish (see above), fix that first.",
                "Use momentum or Adam, and a schedule with warm-up."]
    if chance:
        remedies.append("Check that the labels match the inputs (a shuffled or constant target gives chance accuracy "
                        "whatever the model).")
    title = "The model is not learning: accuracy at chance level" if chance else TITLES["stalled"]
    return Finding("stalled", title, summary, evidence, remedies, [], span)


def _unused(run: RunData, alerts: list[dict[str, Any]]) -> Finding:
    names = _ordered_union(alerts, _layer_order(run))
    first, last = _steps(alerts)
    listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    summary = (f"{plural(len(names), 'parameter')} got an exactly zero gradient on every step because their input "
               f"is all zeros: they are structurally unused, not a vanishing gradient: {listing}.")
    evidence = [count_span(len(alerts), "unused alert", first, last)]
    evidence += [str(m) for m in dict.fromkeys(str(a.get("message", "")) for a in alerts) if m][:3]
    remedies = ["If they should take part, check what feeds them: the input, feature or branch that reaches them "
                "is all zeros (a masked or constant feature, a disconnected branch).",
                "If they are not meant to train, freeze them (requires_grad_(False)) or remove them."]
    return Finding("unused", TITLES["unused"], summary, evidence, remedies, names, (first, last))


def _clipping(run: RunData) -> list[Finding]:
    out = []
    for c in run.clip_summaries:
        frac = _float(c.get("fraction"))
        if not (frac > 0.5):
            continue
        policy, opt = str(c.get("policy", "?")), _int(c.get("optimizer"), 0)
        steps, clipped = _int(c.get("steps"), 0), _int(c.get("clipped"), 0)
        typical, bound = _float(c.get("typical_norm")), _float(c.get("bound"))
        message = c.get("message") if isinstance(c.get("message"), str) and c.get("message") else None
        summary = message.removeprefix("bpkit ") if message else \
            (f"GradientClipping({policy}) skipped {100 * frac:.0f}% of steps: most updates are dropped, not only "
             f"spikes" if policy == "skip" else
             f"GradientClipping({policy}) clipped {100 * frac:.0f}% of steps: the bound is below the typical norm; "
             f"this rescales every update")
        summary = summary.rstrip(".") + "."
        evidence = [f"optimizer {opt}: {clipped} of {steps} steps clipped ({100 * frac:.0f}%)"]
        norms = [f"typical gradient norm {typical:.3g}" if math.isfinite(typical) else "",
                 f"bound {bound:.3g}" if math.isfinite(bound) else ""]
        if any(norms):
            evidence.append(", ".join(n for n in norms if n))
        remedies = [f"Raise the bound to about the typical norm{f' ({typical:.3g})' if math.isfinite(typical) else ''}"
                    " so clipping only catches outliers, or use an adaptive policy ('zclip', 'autoclip').",
                    "If the gradients are large on every step, lower the learning rate instead: clipping every step "
                    "is a smaller learning rate in disguise."]
        out.append(Finding("clipping", TITLES["clipping"], summary, evidence, remedies, [], None))
    return out


def _explained_by_unused(name: str, unused: set[str]) -> bool:
    return name in unused or any(u.startswith(name + ".") for u in unused)


def _without_unused(alerts: list[dict[str, Any]], unused: set[str]) -> list[dict[str, Any]]:
    """The alerts with the names an ``unused`` alert already explains taken out (an alert left with none is
    dropped)."""
    out = []
    for a in alerts:
        names = _split_names(a.get("where", ""))
        keep = [n for n in names if not _explained_by_unused(n, unused)]
        if keep:
            out.append(a if len(keep) == len(names) else {**a, "where": ", ".join(keep)})
    return out


def _float(v: Any) -> float:
    if isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _ordered_union(alerts: list[dict[str, Any]], order: list[str]) -> list[str]:
    names = list(dict.fromkeys(n for a in alerts for n in _split_names(a.get("where", ""))))
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def diagnose(run: RunData) -> list[Finding]:
    """All findings of a run, most urgent first; an empty list means no problem was found.

    Example::

        >>> from bpkit.record import RunData
        >>> from pathlib import Path
        >>> diagnose(RunData(path=Path("bpkit_record.jsonl")))
        []
    """
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for a in run.alerts:
        by_kind.setdefault(str(a.get("kind")), []).append(a)
    unused = {n for a in by_kind.get("unused", []) for n in _split_names(a.get("where", ""))}
    if unused:
        for kind in ("vanishing", "dead"):
            if kind in by_kind:
                by_kind[kind] = _without_unused(by_kind[kind], unused)
    found: list[Finding] = []
    if run.status == "crashed" or (run.status == "running" and run.last_steps_error):
        found.append(_crashed(run))
    nan_loss = any(not np.isfinite(run.series(k)[1]).all() for k in _loss_keys_checked(run))
    if by_kind.get("nonfinite") or nan_loss:
        found.append(_nonfinite(run, by_kind.get("nonfinite", [])))
    if by_kind.get("exploding"):
        found.append(_exploding(run, by_kind["exploding"]))
    failed_check = any(not rep.get("passed", True) for _, rep in run.gradchecks)
    if by_kind.get("gradcheck") or failed_check:
        found.append(_gradcheck(run, by_kind.get("gradcheck", [])))
    if by_kind.get("vanishing"):
        found.append(_vanishing(run, by_kind["vanishing"]))
    for kind in ("dead", "saturated"):
        if by_kind.get(kind):
            found.append(_units(run, by_kind[kind], kind))
    if by_kind.get("unused"):
        found.append(_unused(run, by_kind["unused"]))
    if by_kind.get("spike"):
        found.append(_spike(run, by_kind["spike"]))
    if by_kind.get("sharpness"):
        found.append(_sharpness(run, by_kind["sharpness"]))
    if by_kind.get("saddle"):
        found.append(_saddle(run, by_kind["saddle"]))
    found += _clipping(run)
    stalled = _stalled(run)
    if stalled is not None:
        found.append(stalled)
    found.sort(key=lambda f: ORDER.index(f.kind))
    return _causal_order(found)


CONSEQUENCES = ("vanishing", "dead", "saturated", "stalled", "exploding", "spike", "unused")


def _causal_order(found: list[Finding]) -> list[Finding]:
    """Group what followed the first NaN/Inf under it: a finding of a consequence kind (vanishing, dead units, a
    stalled loss, exploding, ...) first seen after the first non-finite step gets ``after`` set and is placed right
    after the NaN finding; a loss that does not go down in a run that became non-finite is the divergence itself
    and is grouped too. Root problems keep their order, most urgent first."""
    nan = next((f for f in found if f.kind == "nonfinite" and f.steps and f.steps[0] >= 0), None)
    if nan is None:
        return found
    first = nan.steps[0]
    after = [f for f in found if f.kind in CONSEQUENCES and f.steps is not None
             and (f.steps[0] > first or f.kind == "stalled")]
    for f in after:
        f.after = first
    before = [f for f in found if f.kind == "exploding" and f.after is None and f.steps and f.steps[0] <= first]
    if before:
        nan.evidence.insert(0, f"preceded by exploding gradients from step {before[0].steps[0]}: the likely cause")
    roots = [f for f in found if f.after is None]
    i = roots.index(nan) + 1
    return roots[:i] + after + roots[i:]


def root_findings(findings: list[Finding]) -> list[Finding]:
    """The findings that are problems of their own (not consequences of an earlier NaN)."""
    return [f for f in findings if f.after is None]


NO_PROBLEMS = "No problems found"
NO_STATISTICS = "No statistics recorded: no problems can be ruled out"


def summary_line(findings: list[Finding], run: RunData | None = None) -> str:
    """``"No problems found"`` or ``"vanishing gradients, dead units"``; with the run, ``NO_STATISTICS`` instead of
    ``NO_PROBLEMS`` when it recorded no gradient or activation statistics."""
    if not findings:
        return NO_STATISTICS if run is not None and not has_statistics(run) else NO_PROBLEMS
    parts = []
    for f in root_findings(findings):
        then = [g.title[0].lower() + g.title[1:] for g in findings if g.after is not None and f.kind == "nonfinite"]
        parts.append(f.title + (f" (then: {', '.join(then)})" if then else ""))
    return "; ".join(parts)

