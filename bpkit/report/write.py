"""Write the report of one run, or the comparison of a Hydra multirun sweep."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpkit.errors import BpkitConfigError
from bpkit.report import html as H
from bpkit.report import plots
from bpkit.report.findings import Finding, diagnose, summary_line, train_loss_keys
from bpkit.report.record import RECORD_NAME, RunData, read_run

REPORT_NAME = "bpkit_report.html"
SWEEP_SUMMARY = "bpkit_sweep.jsonl"  # bpkit.sweep.SUMMARY_NAME


def is_multirun(path: str | os.PathLike) -> bool:
    """A Hydra sweep directory: ``multirun.yaml``, or job folders with ``.hydra/overrides.yaml`` and no
    record of its own."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "multirun.yaml").is_file() or (p / SWEEP_SUMMARY).is_file():
        return True
    return not (p / RECORD_NAME).is_file() and any((c / ".hydra" / "overrides.yaml").is_file()
                                                   for c in p.iterdir() if c.is_dir())


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
    figures = plots.all_figures(run)
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
    metric_keys = sorted({k for r in rows for k in r.metrics if not k.startswith("grad/")})
    headers = ["job", "overrides", "status"] + metric_keys + ["findings"]
    table_rows = []
    for r in rows:
        link = r.path / REPORT_NAME
        name = H.Markup(f'<a href="{H.esc(os.path.relpath(link, target.parent))}">{H.esc(r.name)}</a>'
                        if link.is_file() else H.esc(r.name))
        status = H.Markup(f'<span class="{"good" if r.status == "finished" else "bad"}">{H.esc(r.status)}</span>'
                          + (f"<br><small>{H.esc(r.error)}</small>" if r.error else ""))
        found = summary_line(r.findings, r.run) if r.run is not None else "-"
        table_rows.append([name, " ".join(r.overrides) or "(none)", status]
                          + [r.metrics.get(k, float("nan")) for k in metric_keys] + [found])
    numeric = set(range(3, 3 + len(metric_keys)))
    body = [f"<h1>bpkit sweep comparison</h1><div class=\"meta\">Sweep <code>{H.esc(base)}</code> &middot; "
            f"{len(rows)} jobs: {sum(r.status == 'finished' for r in rows)} finished, "
            f"{sum(r.status in ('failed', 'crashed') for r in rows)} failed or crashed</div>",
            "<h2>Jobs</h2>", H.table(headers, table_rows, numeric)]
    fig = _sweep_loss(rows)
    if fig is not None:
        png = plots.save(fig, png_dir / "sweep_loss.png")
        body.append(f'<figure id="fig-sweep_loss">{H.img_tag(png, "sweep loss")}<figcaption>Training loss of every '
                    f'job.</figcaption></figure>')
    body.append("<h2>Findings per job</h2>")
    for r in rows:
        if r.run is None:
            body.append(f"<h3>Job {H.esc(r.name)}: failed</h3><p>{H.esc(r.error)}</p>")
            continue
        body.append(f"<h3>Job {H.esc(r.name)} ({H.esc(' '.join(r.overrides) or 'no overrides')})</h3>"
                    + H.findings_html(r.findings, r.run))
    target.write_text(H.page(f"bpkit sweep: {base.name}", "\n".join(body)), encoding="utf-8")
    return target


def _sweep_loss(rows: list[JobRow]) -> Any:
    series = []
    for r in rows:
        keys = train_loss_keys(r.run) if r.run is not None else []
        if keys:
            series.append((r, keys[0], r.run.series(keys[0])))
    if not series:
        return None
    fig = plots._figure(8, 4.2)
    ax = fig.add_subplot()
    for r, key, (s, v) in series:
        ax.plot(s, v, lw=1.2, label=plots.plain(f"{r.name}: {' '.join(r.overrides)[:50]}"
                                                + ("" if key == "train/loss" else f" ({key})")))
    names = sorted({key for _, key, _ in series})
    plots.finish_loss_axes(ax, [v for _, _, (_, v) in series], ", ".join(names), "Training loss per job")
    return fig
