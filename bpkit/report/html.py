"""Self-contained HTML: styles inline, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any

from bpkit.diagnosis.findings import (NO_PROBLEMS, Finding, last_steps_table, no_statistics_note, plural,
                                      root_findings, train_loss_keys)
from bpkit.record import RunData

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:28px 0 10px;border-bottom:2px solid #dde1e7;padding-bottom:4px}
.meta{color:#5b6475;font-size:14px} .warn{background:#fff4d6;border:1px solid #e8c35a;padding:8px 12px;border-radius:6px;margin:10px 0}
.ok{background:#e3f6e8;border:1px solid #6cc58a;padding:14px 18px;border-radius:8px;font-size:18px;font-weight:600}
.finding{background:#fff;border-left:6px solid #d9534f;border-radius:6px;padding:12px 18px;margin:12px 0;box-shadow:0 1px 3px #0002}
.finding.k-vanishing,.finding.k-saturated,.finding.k-stalled{border-color:#f0ad4e}
.finding.k-dead,.finding.k-spike{border-color:#e67e22}
.finding h3{margin:0 0 6px;font-size:18px} .finding .sum{font-size:15px;margin:4px 0 8px}
.finding ul{margin:4px 0 8px 18px;font-size:13px;color:#39414f} .finding ol{margin:4px 0 0 18px;font-size:14px}
figure{background:#fff;margin:14px 0;padding:10px;border-radius:6px;box-shadow:0 1px 3px #0002}
figure img{max-width:100%;height:auto;display:block;margin:0 auto} figcaption{font-size:13px;color:#5b6475;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0;box-shadow:0 1px 3px #0002}
th,td{border:1px solid #dde1e7;padding:4px 8px;text-align:left;vertical-align:top} th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums} .bad{color:#c9302c;font-weight:600} .good{color:#2b8a3e}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
.finding.after{margin-left:36px;border-left-style:dashed;box-shadow:none;background:#fbfbfc}
.finding .after-tag{display:inline-block;font-size:12px;color:#5b6475;background:#eef1f5;border-radius:3px;padding:1px 6px;margin-bottom:4px}
.cut{cursor:help;border-bottom:1px dotted #99a}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)
    return str(v)


def img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def findings_html(findings: list[Finding], run: RunData | None = None) -> str:
    """The diagnosis: the findings, or the verdict; with the run, a record without any gradient or activation
    statistics says so instead of "No problems found"."""
    note = no_statistics_note(run) if run is not None else None
    if not findings:
        if note:
            return f'<div class="warn" id="verdict"><b>{esc(note)}</b></div>'
        return (f'<div class="ok" id="verdict">{NO_PROBLEMS}: no alert was raised and the logged statistics look '
                f'healthy.</div>')
    roots = root_findings(findings)
    parts = [f'<p id="verdict"><b>{plural(len(roots), "problem")} found</b>, most urgent first'
             + (f'; {plural(len(findings) - len(roots), "consequence")} of the first NaN/Inf shown under it'
                if len(roots) < len(findings) else "") + '.</p>']
    if note:
        parts.append(f'<div class="warn" id="no-statistics">{esc(note)}</div>')
    for f in findings:
        steps = f" (steps {f.steps[0]}-{f.steps[1]})" if f.steps and f.steps[0] != f.steps[1] else \
            (f" (step {f.steps[0]})" if f.steps else "")
        ev = "".join(f"<li>{esc(e)}</li>" for e in f.evidence)
        rem = "".join(f"<li>{esc(r)}</li>" for r in f.remedies)
        tag = "" if f.after is None else (
            f'<div class="after-tag">before the NaN at step {f.after}: part of the divergence</div>'
            if f.steps and f.steps[1] < f.after else f'<div class="after-tag">after the NaN at step {f.after}</div>')
        parts.append(f'<div class="finding k-{esc(f.kind)}{" after" if f.after is not None else ""}">{tag}'
                     f'<h3>{esc(f.title)}{esc(steps)}</h3>'
                     f'<div class="sum">{esc(f.summary)}</div><b>Evidence</b><ul>{ev}</ul>'
                     f'<b>What to try, in order</b><ol>{rem}</ol></div>')
    return "\n".join(parts)


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(fmt(c))}</td>' if i in numeric else f"<td>{c if isinstance(c, Markup) else esc(c)}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Markup(str):
    """Trusted HTML inside a table cell."""


def cut(text: Any, width: int) -> Markup:
    """A table cell's text cut to ``width`` characters with an ellipsis, the full text on hover (``title``)."""
    text = str(text)
    if len(text) <= width:
        return Markup(esc(text))
    return Markup(f'<span class="cut" title="{esc(text)}">{esc(text[:width - 1].rstrip())}&hellip;</span>')


def gradcheck_html(run: RunData) -> str:
    parts = []
    for step, rep in run.gradchecks:
        if "skipped" in rep:  # GradientCheck could not check this module: say why and how to check by hand
            parts.append(f"<p>Step {step}: <b>skipped</b>: {esc(rep['skipped'])}"
                         f"{'. To check by hand: ' + esc(rep['hint']) if rep.get('hint') else ''}</p>")
            continue
        ok = rep.get("passed", True)
        verdict = '<span class="good">passed</span>' if ok else '<span class="bad">FAILED</span>'
        parts.append(f"<p>Step {step}: {verdict} ({esc(rep.get('mode', ''))} mode, {esc(rep.get('dtype', ''))}, "
                     f"eps {esc(fmt(rep.get('eps')))}, rtol {esc(fmt(rep.get('rtol')))}; largest relative error "
                     f"{esc(fmt(rep.get('max_rel_error')))})</p>")
        shape = lambda p: "x".join(str(s) for s in p["shape"]) if isinstance(p.get("shape"), list) else \
            str(p.get("shape", ""))  # noqa: E731
        rows = [[p.get("name"), shape(p), p.get("probes"), p.get("grad_norm"),
                 p.get("max_abs_error"), p.get("rel_error"),
                 Markup('<span class="good">yes</span>' if p.get("passed") else '<span class="bad">no</span>'),
                 p.get("reason", "")] for p in rep.get("params", [])]
        parts.append(table(["tensor", "shape", "probes", "grad norm", "max abs error", "rel error", "passed", "note"],
                           rows, {2, 3, 4, 5}))
        if rep.get("unchecked"):
            parts.append(f"<p>Coverage: {esc(rep.get('coverage', ''))}</p>")
    return "\n".join(parts)


def run_header(run: RunData, findings: list[Finding]) -> str:
    meta = run.meta
    status = run.status
    lines = [f"<h1>bpkit report</h1><div class=\"meta\">Run <code>{esc(run.run_dir.resolve())}</code> &middot; status "
             f"<b>{esc(status)}</b>"]
    if meta.get("model"):
        lines.append(f" &middot; model {esc(meta['model'])} ({esc(fmt(meta.get('num_params', '?')))} parameters)")
    steps = [int(s[-1]) for s, _ in run.scalars.values() if len(s)]
    if steps:
        lines.append(f" &middot; last logged step {max(steps)}")
    if meta.get("start_time"):
        lines.append(f" &middot; started {esc(meta['start_time'])}")
    if meta.get("end_time"):
        lines.append(f", ended {esc(meta['end_time'])}")
    lines.append(f" &middot; report written {esc(_dt.datetime.now().isoformat(timespec='seconds'))}</div>")
    if status == "running":
        lines.append('<div class="warn">No end marker in the record: the run is still going, or it was killed before '
                     'it could write one (the RunRecord callback writes it). This report shows what was logged so '
                     'far.</div>')
    if run.truncated or run.bad_lines:
        lines.append(f'<div class="warn">{run.bad_lines} unreadable line(s) in the record were skipped'
                     f'{" (the last line was cut short, as after a crash or while writing)" if run.truncated else ""}'
                     f'.</div>')
    return "".join(lines)


def final_metrics(run: RunData) -> dict[str, float]:
    """The last value of every validation/test metric and of the training loss."""
    out = {}
    losses = set(train_loss_keys(run))
    for key in run.scalars:
        if key.startswith(("val/", "test/")) or key in losses or key == "grad/norm_total":
            v = run.last(key)
            if v is not None:
                out[key] = v
    return out


def interventions_html(run: RunData) -> str:
    """One row per ``clip_summary`` entry: how often each clipping intervention acted."""
    def fraction(v: Any) -> Markup:
        f = _num(v)
        return Markup(f'<span class="{"bad" if f > 0.5 else "good"}">{esc(f"{100 * f:.0f}%")}</span>')

    rows = [[c.get("policy"), c.get("optimizer"), c.get("steps"), c.get("clipped"), fraction(c.get("fraction")),
             c.get("typical_norm"), c.get("bound"), c.get("message") or ""] for c in run.clip_summaries]
    return table(["policy", "optimizer", "steps", "clipped", "fraction clipped", "typical norm", "bound", "note"],
                 rows, {2, 3, 5, 6})


def last_steps_html(run: RunData) -> str:
    """The last steps before a crash (buffered values written on the exception, else the last logged ones)."""
    end = run.meta.get("end_step")
    rows = last_steps_table(run, end if isinstance(end, int) and not isinstance(end, bool) else None)
    if not rows:
        return ""
    cols = [c for c in ("loss", "grad_norm_total", "nonfinite", "lr") if any(c in r for r in rows)]
    return table(["step"] + [c.replace("_", " ") for c in cols], [[r["step"]] + [r.get(c, "") for c in cols]
                                                                 for r in rows], set(range(len(cols) + 1)))


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan


MAX_ALERT_ROWS = 60


def alert_groups(run: RunData) -> list[dict[str, Any]]:
    """The alerts collapsed: one group per ``(kind, where)`` with its count, first and last step, the worst value
    (the lowest for ``vanishing``, else the highest) and its first message; in order of the first step."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for a in sorted(run.alerts, key=lambda a: int(a.get("step", 0))):
        kind, where, step, value = str(a.get("kind")), str(a.get("where", "")), int(a.get("step", 0)), \
            _num(a.get("value"))
        g = groups.get((kind, where))
        if g is None:
            groups[(kind, where)] = {"kind": kind, "where": where, "count": 1, "first": step, "last": step,
                                     "value": value, "threshold": a.get("threshold"), "message": a.get("message", "")}
            continue
        g["count"] += 1
        g["last"] = step
        if math.isnan(g["value"]) or (value < g["value"] if kind == "vanishing" else value > g["value"]):
            g["value"] = value
    return list(groups.values())


def alerts_html(run: RunData) -> str:
    """The alerts, repeated ones collapsed into one row with a count and a step range (at most
    ``MAX_ALERT_ROWS`` rows; the rest counted)."""
    if not run.alerts:
        return "<p>No alert was raised.</p>"
    groups = alert_groups(run)
    rows = [[g["first"] if g["first"] == g["last"] else Markup(f'{g["first"]}&ndash;{g["last"]}'), g["count"],
             g["kind"], cut(g["where"], 80), g["value"], g["threshold"], cut(g["message"], 160)]
            for g in groups[:MAX_ALERT_ROWS]]
    intro = (f"<p>{plural(len(run.alerts), 'alert')} in {plural(len(groups), 'group')} (same kind and place); "
             f"the value is the worst one of the group.</p>") if len(groups) < len(run.alerts) else ""
    more = f"<p>{len(groups) - MAX_ALERT_ROWS} more groups not shown.</p>" if len(groups) > MAX_ALERT_ROWS else ""
    return intro + table(["steps", "count", "kind", "where", "worst value", "threshold", "first message"], rows,
                         {1, 4, 5}) + more
