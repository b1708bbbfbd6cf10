"""Write the report of one run, or the comparison of a Hydra multirun sweep."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpkit.errors import BpkitConfigError
from bpkit.diagnosis import plots
from bpkit.diagnosis.findings import Finding, diagnose, summary_line, train_loss_keys
from bpkit.record import RECORD_NAME, RunData, find_records, read_run
from bpkit.report import html as H

REPORT_NAME = "bpkit_report.html"
SWEEP_SUMMARY = "bpkit_sweep.jsonl"  # bpkit.sweep.SUMMARY_NAME


def is_multirun(path: str | os.PathLike) -> bool:
    """A Hydra sweep directory (``multirun.yaml``, or job folders with ``.hydra/overrides.yaml`` and no record of
    its own), or a directory holding several runs (two or more records below it and none of its own): both are
    reported as a comparison of their runs, never as one run picked among them."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "multirun.yaml").is_file() or (p / SWEEP_SUMMARY).is_file():
        return True
    if (p / RECORD_NAME).is_file():
        return False
    return any((c / ".hydra" / "overrides.yaml").is_file() for c in p.iterdir() if c.is_dir()) or \
        several_runs(p)


def several_runs(path: str | os.PathLike) -> bool:
    """A directory that is no Hydra sweep but holds two or more run records below it (``version_0``,
    ``version_1``, or runs side by side), and no record of its own."""
    p = Path(path)
    return p.is_dir() and not (p / RECORD_NAME).is_file() and not (p / "multirun.yaml").is_file() and \
        not (p / SWEEP_SUMMARY).is_file() and len(find_records(p)) >= 2


def _files_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_files")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the HTML report (figures embedded) and its PNGs for a run or a multirun directory.

    Args:
        run_dir: a run directory (holding ``bpkit_record.jsonl`` directly or in a logger's version folder),
            the record file itself, or a Hydra multirun directory.
        out: the HTML file to write; default ``<run_dir>/bpkit_report.html``. PNGs go to
            ``<out stem>_files/`` next to it.

    Returns:
        The path of the HTML file.

    Raises:
        BpkitConfigError: ``run_dir`` is not a run (no record), or its record is empty.

    Example::

        >>> from bpkit.report import write_report
        >>> write_report("outputs/2024-05-01/12-00-00")  # doctest: +SKIP
        PosixPath('outputs/2024-05-01/12-00-00/bpkit_report.html')
    """
    base = Path(run_dir)
    if is_multirun(base):
        return write_multirun_report(base, out)
    run = read_run(base)
    target = Path(out) if out is not None else (base if base.is_dir() else base.parent) / REPORT_NAME
    findings = diagnose(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_run(run, findings, _files_dir(target)), encoding="utf-8")
    return target


def render_run(run: RunData, findings: list[Finding], png_dir: Path) -> str:
    """The HTML page of one run; writes its PNGs into ``png_dir``."""
    body = [H.run_header(run, findings), "<h2>Diagnosis</h2>", H.findings_html(findings, run)]
    metrics = H.final_metrics(run)
    if metrics:
        body.append("<h2>Final metrics</h2>" + H.table(["metric", "last value"], [[k, v] for k, v in metrics.items()],
                                                        {1}))
    figures = plots.all_figures(run, findings)
    if figures:
        body.append("<h2>Figures</h2>")
    for stem, caption, fig in figures:
        png = plots.save(fig, png_dir / f"{stem}.png")
        body.append(f'<figure id="fig-{stem}">{H.img_tag(png, stem)}<figcaption>{H.esc(caption)}</figcaption></figure>')
    last = H.last_steps_html(run) if any(f.kind == "crashed" for f in findings) else ""
    if last:
        body.append("<h2>The last steps before the crash</h2>" + last)
    if run.clip_summaries:
        body.append("<h2>Interventions</h2>" + H.interventions_html(run))
    noise = run.events.get("noise_scale", [])
    if noise:
        step, data = noise[-1]
        body.append("<h2>Batch size and gradient noise</h2>" + f"<p>{H.esc(str(data.get('sentence', '')))}</p>"
                    + f'<p class="meta">NoiseScaleMonitor at step {step}: B_simple '
                    f'{H.esc(str(data.get("b_simple")))} ({H.esc(str(data.get("method", "")))}).</p>')
    if run.gradchecks:
        body.append("<h2>Gradient check</h2>" + H.gradcheck_html(run))
    body.append("<h2>Alerts</h2>" + H.alerts_html(run))
    body.append(f'<p class="meta">Record: <code>{H.esc(run.path)}</code>, {run.entries} entries; figures also '
                f'saved as PNG in <code>{H.esc(png_dir)}</code>.</p>')
    return H.page(f"bpkit report: {run.run_dir.name}", "\n".join(body))


# ------------------------------------------------------------------ multirun


@dataclass
class JobRow:
    """One job of a sweep."""

    name: str
    path: Path
    overrides: list[str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    error: str = ""
    run: RunData | None = None


def _overrides(job: Path) -> list[str]:
    f = job / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return ["(unreadable overrides.yaml)"]
    return [str(x) for x in data] if isinstance(data, list) else []


def _job_key(p: Path) -> tuple[int, str]:
    return (int(p.name), "") if p.name.isdigit() else (1 << 30, p.name)


def _sweep_summary(base: Path) -> dict[str, dict[str, Any]]:
    """``bpkit_sweep.jsonl`` (written by bpkit's Hydra sweep callback), by job folder name; bad lines skipped."""
    path = base / SWEEP_SUMMARY
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            out[str(entry["job"])] = entry
        except (ValueError, KeyError, TypeError):
            continue
    return out


def collect_jobs(sweep_dir: str | os.PathLike) -> list[JobRow]:
    """One row per job of a Hydra multirun directory: its folders, and the jobs ``bpkit_sweep.jsonl`` lists
    (a failed job whose folder was removed still gets a row). A job without a record is a failed job."""
    base = Path(sweep_dir)
    summary = _sweep_summary(base)
    if several_runs(base) and not any((c / ".hydra" / "overrides.yaml").is_file() for c in base.iterdir()
                                      if c.is_dir()):
        return [_run_row(base, rec) for rec in find_records(base)]
    jobs = {c.name: c for c in base.iterdir() if c.is_dir() and ((c / ".hydra").is_dir() or any(c.rglob(RECORD_NAME)))}
    for name in summary:
        jobs.setdefault(name, base / name)
    rows = []
    for job in sorted(jobs.values(), key=_job_key):
        entry = summary.get(job.name, {})
        row = JobRow(job.name, job, _overrides(job) or [str(o) for o in entry.get("overrides", [])], "failed")
        try:
            run = read_run(job)
        except BpkitConfigError as err:
            row.error = entry.get("error") or \
                f"no usable record: the job failed before logging ({err.expected.split(':')[0]})"
            rows.append(row)
            continue
        row.run = run
        row.status = {"running": "incomplete"}.get(run.status, run.status)
        row.metrics = H.final_metrics(run)
        row.findings = diagnose(run)
        if entry.get("status") == "failed" and row.status != "crashed":
            row.status = "failed"
        if row.status in ("crashed", "failed"):
            row.error = str(entry.get("error") or run.meta.get("error", ""))[:300]
        rows.append(row)
    return rows


def _run_row(base: Path, record: Path) -> JobRow:
    """A row for one of several runs found below ``base`` (no Hydra overrides): named by its folder."""
    job = record.parent
    name = job.relative_to(base).as_posix() if job != base else job.name
    row = JobRow(name, job, _overrides(job), "failed")
    try:
        run = read_run(record)
    except BpkitConfigError as err:
        row.error = f"no usable record ({err.expected.split(':')[0]})"
        return row
    row.run, row.status = run, {"running": "incomplete"}.get(run.status, run.status)
    row.metrics, row.findings = H.final_metrics(run), diagnose(run)
    if row.status == "crashed":
        row.error = str(run.meta.get("error", ""))[:300]
    return row


def shared_overrides(rows: list[JobRow]) -> list[str]:
    """The overrides every job (with overrides) of a sweep has; empty for fewer than two such jobs."""
    lists = [r.overrides for r in rows if r.overrides]
    if len(lists) < 2:
        return []
    return [o for o in lists[0] if all(o in other for other in lists[1:])]


def best_job(rows: list[JobRow]) -> tuple[JobRow | None, str, str]:
    """``(row, metric, "max"|"min")``: the finished job with the best final value of the sweep's monitored metric
    (the one ``bpkit_sweep.jsonl`` names, else ``val/acc``, else ``val/loss``, else the training loss)."""
    from bpkit.sweep import metric_direction

    base = rows[0].path.parent if rows else Path(".")
    named = [str(e.get("monitor")) for e in _sweep_summary(base).values() if e.get("monitor")]
    candidates = named + ["val/acc", "val/loss"] + [k for r in rows if r.run is not None
                                                    for k in train_loss_keys(r.run)]
    for metric in candidates:
        scored = [(r.metrics[metric], r) for r in rows if r.status == "finished" and metric in r.metrics
                  and r.metrics[metric] == r.metrics[metric] and abs(r.metrics[metric]) != float("inf")]
        if scored:
            direction = metric_direction(metric)
            value, row = (max if direction == "max" else min)(scored, key=lambda x: x[0])
            return row, metric, direction
    return None, "", ""


def write_multirun_report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The comparison page of a sweep: one row per job with overrides, status, final metrics, findings.

    Raises:
        BpkitConfigError: when the directory holds no job folder.
    """
    base = Path(sweep_dir)
    rows = collect_jobs(base)
    if not rows:
        raise BpkitConfigError("run_dir", str(base), "a Hydra multirun directory with job folders (0/, 1/, ...)")
    target = Path(out) if out is not None else base / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    png_dir = _files_dir(target)
    several = several_runs(base) and not any(r.overrides for r in rows)
    if several:  # runs side by side, not a Hydra sweep: each run gets its own report too
        for r in rows:
            if r.run is not None:
                write_report(r.run.path, r.path / REPORT_NAME)
    shared = shared_overrides(rows)
    best, metric, direction = best_job(rows)
    metric_keys = sorted({k for r in rows for k in r.metrics if not k.startswith("grad/")})
    headers = ["job", "overrides" + (" (besides the shared ones)" if shared else ""), "status"] + metric_keys + \
        ["findings"]
    table_rows = []
    for r in rows:
        link = r.path / REPORT_NAME
        star = ' <b class="good" title="best ' + H.esc(f"{metric} ({direction})") + '">&#9733; best</b>' \
            if r is best else ""
        name = H.Markup((f'<a href="{H.esc(os.path.relpath(link, target.parent))}">{H.esc(r.name)}</a>'
                         if link.is_file() else H.esc(r.name)) + star)
        status = H.Markup(f'<span class="{"good" if r.status == "finished" else "bad"}">{H.esc(r.status)}</span>'
                          + (f"<br><small>{H.cut(r.error, 300)}</small>" if r.error else ""))
        found = summary_line(r.findings, r.run) if r.run is not None else "-"
        own = [o for o in r.overrides if o not in shared]
        table_rows.append([name, " ".join(own) or ("(only the shared ones)" if shared else "(none)"), status]
                          + [r.metrics.get(k, float("nan")) for k in metric_keys] + [found])
    numeric = set(range(3, 3 + len(metric_keys)))
    what = f"{len(rows)} runs" if several else f"{len(rows)} jobs"
    body = [f"<h1>bpkit {'runs' if several else 'sweep'} comparison</h1><div class=\"meta\">"
            f"{'Directory' if several else 'Sweep'} <code>{H.esc(base)}</code> &middot; "
            f"{what}: {sum(r.status == 'finished' for r in rows)} finished, "
            f"{sum(r.status in ('failed', 'crashed') for r in rows)} failed or crashed</div>"]
    if shared:
        body.append(f'<p id="shared-overrides">Overrides shared by every job: <code>{H.esc(" ".join(shared))}'
                    f'</code></p>')
    if best is not None:
        body.append(f'<p id="best-job">Best job: <b>{H.esc(best.name)}</b> ({H.esc(metric)} '
                    f'{H.esc(H.fmt(best.metrics[metric]))}, {"highest" if direction == "max" else "lowest"}).</p>')
    body += ["<h2>Runs</h2>" if several else "<h2>Jobs</h2>", H.table(headers, table_rows, numeric)]
    fig = _sweep_loss(rows, shared, best)
    if fig is not None:
        png = plots.save(fig, png_dir / "sweep_loss.png")
        body.append(f'<figure id="fig-sweep_loss">{H.img_tag(png, "sweep loss")}<figcaption>Training loss of every '
                    f'job.</figcaption></figure>')
    body.append("<h2>Findings per job</h2>")
    for r in rows:
        if r.run is None:
            body.append(f"<h3>Job {H.esc(r.name)}: failed</h3><p>{H.esc(r.error)}</p>")
            continue
        own = " ".join(o for o in r.overrides if o not in shared)
        body.append(f"<h3>{'Run' if several else 'Job'} {H.esc(r.name)} ({H.esc(own or 'no overrides of its own')})"
                    f"{' &#9733; best' if r is best else ''}</h3>"
                    + H.findings_html(r.findings, r.run))
    target.write_text(H.page(f"bpkit {'runs' if several else 'sweep'}: {base.name}", "\n".join(body)),
                      encoding="utf-8")
    return target


def _sweep_loss(rows: list[JobRow], shared: list[str] | None = None, best: JobRow | None = None) -> Any:
    """Every job's training loss; legend labels in full (the job's own overrides; the shared ones are said
    once in the title), the best job drawn thicker and starred."""
    series = []
    for r in rows:
        keys = train_loss_keys(r.run) if r.run is not None else []
        if keys:
            series.append((r, keys[0], r.run.series(keys[0])))
    if not series:
        return None
    shared = shared or []
    fig = plots.figure(11, 4.6)
    ax = fig.add_subplot()
    for r, key, (s, v) in series:
        own = " ".join(o for o in r.overrides if o not in shared) or "(shared overrides only)"
        label = f"{'* ' if r is best else ''}{r.name}: {own}" + ("" if key == "train/loss" else f" ({key})") + \
            (" (best)" if r is best else "")
        ax.plot(s, np.where(np.isfinite(v), v, np.nan), lw=2.6 if r is best else 1.2, label=plots.plain(label))
    names = sorted({key for _, key, _ in series})
    title = "Training loss per job" + (f" (all with {' '.join(shared)})" if shared else "")
    plots.finish_loss_axes(ax, [v for _, _, (_, v) in series], ", ".join(names), plots.plain(title))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig
