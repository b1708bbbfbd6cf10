"""bpkit-report on broken and short runs (issue 17): a diverging run's alerts collapsed and its consequences
grouped under the first NaN, "not learning" on short runs, histograms of a 50-step run, sweeps (shared overrides,
best job, a job at chance accuracy) and a directory holding several runs."""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bpkit import Alert
from bpkit.callbacks import GradientMonitor, RunRecord, _sink
from bpkit.data import DigitsDataModule
from bpkit.models import MLP
from bpkit.report import NO_PROBLEMS, diagnose, read_run, summary_line, write_report
from bpkit.report.cli import main as report_main
from bpkit.report.findings import count_span
from bpkit.report.plots import learning_rate, loss as loss_figure, norm_vs_depth
from tests.test_report import _fake_trainer

warnings.filterwarnings("ignore", ".*bpkit.*")
LAYERS = ["model.rnn.weight_ih_l0", "model.rnn.weight_hh_l0", "model.head.weight"]


def _alert(tr, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sink.log_alert(tr, Alert(*args))


def write_diverging(root: Path, nan_at: int = 22, steps: int = 800, every: int = 1) -> Path:
    """A record as an exploding RNN without clipping leaves it, written with bpkit's own sink: the gradient norm
    explodes from step 12, the loss is NaN from ``nan_at`` on, a non-finite alert at every step after it (hundreds
    of identical rows), then vanishing gradients and a stalled loss as consequences."""
    tr = _fake_trainer(root)
    _sink.log_record(tr, "run", 0, {"event": "start", "status": "running", "log_every_n_steps": every,
                                    "model": "RNN"})
    for s in range(0, steps, every):
        blown = s >= nan_at
        norms = {f"grad/norm/{n}": (math.nan if blown else 10.0 ** min(s, 18) * (i + 1)) for i, n in
                 enumerate(LAYERS)}
        loss = math.nan if blown else 2.0 * 10 ** (s / 2)
        _sink.log_scalars(tr, {**norms, "grad/norm_total": math.nan if blown else 10.0 ** min(s, 18),
                               "train/loss": loss, "lr/group0": 0.5, "lr/sgd-momentum": 0.9}, s)
    for s in range(12, nan_at):
        _alert(tr, "exploding", s, "model.head.weight", 10.0 ** s, 1e5, f"exploding @ step {s}")
    for s in range(nan_at, steps):
        _alert(tr, "nonfinite", s, "model.head.weight", math.nan, 0.0, f"non-finite gradient @ step {s}")
    for s in range(nan_at + 8, steps, 25):
        _alert(tr, "vanishing", s, "model.rnn.weight_ih_l0, model.rnn.weight_hh_l0", 0.0, 1e-6, "vanishing")
    _sink.log_record(tr, "run", steps, {"event": "end", "status": "finished", "end_step": steps})
    return root


def test_diverging_run_alerts_are_collapsed_and_consequences_follow_the_nan(tmp_path):
    root = write_diverging(tmp_path)
    run = read_run(root)
    assert len(run.alerts) > 800  # 778 non-finite + 10 exploding + 32 vanishing alerts
    findings = diagnose(run)
    kinds = [f.kind for f in findings]
    # the NaN is the root problem; vanishing gradients after it are shown under it, not as problems of their own
    assert kinds[0] == "nonfinite" and findings[0].steps[0] == 22 and findings[0].after is None
    vanishing = next(f for f in findings if f.kind == "vanishing")
    assert vanishing.after == 22 and kinds.index("vanishing") == 1
    exploding = next(f for f in findings if f.kind == "exploding")
    assert exploding.after is None and exploding.steps[0] == 12  # before the NaN: a cause, not a consequence
    assert "preceded by exploding gradients from step 12" in findings[0].evidence[0]
    line = summary_line(findings, run)
    assert line.startswith("NaN/Inf gradients or loss (then: vanishing gradients") and line.count(";") == 1

    html = write_report(root).read_text()
    alerts = html.split("<h2>Alerts</h2>")[1]
    rows = alerts.split("<tbody>")[1].split("</tbody>")[0].count("<tr>")
    assert rows == 3, rows  # one row per (kind, place): bounded whatever the number of steps
    assert "22&ndash;799" in alerts and ">778<" in alerts  # the non-finite group: step range and count
    assert re.search(r'class="finding k-vanishing after"><div class="after-tag">after the NaN at step 22', html)
    assert html.index("k-nonfinite") < html.index("k-vanishing after") < html.index("k-exploding")
    assert "<b>2 problems found</b>" in html  # NaN and exploding; the consequence is not counted as a problem


def test_diverging_loss_plot_is_a_gap_with_one_marker_and_findings_marked(tmp_path):
    run = read_run(write_diverging(tmp_path))
    findings = diagnose(run)
    fig = loss_figure(run, findings)
    ax = fig.axes[0]
    # no vertical line per alert: one dashed line per finding, one triangle for the first NaN
    vlines = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1 and len(ln.get_xdata()) == 2]
    assert sorted(int(ln.get_xdata()[0]) for ln in vlines) == sorted({f.steps[0] for f in findings
                                                                       if f.kind != "stalled"})
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("first NaN/Inf loss (step 22)" in t for t in labels) == 1
    assert any(t.startswith("exploding gradients from step 12") for t in labels)
    train = next(ln for ln in ax.get_lines() if ln.get_label() == "train/loss")
    y = np.asarray(train.get_ydata(), dtype=float)
    assert np.isfinite(y[:22]).all() and np.isnan(y[22:]).all()  # a gap, drawn as no line


def test_lr_axis_holds_only_learning_rates_and_momentum_has_its_own(tmp_path):
    run = read_run(write_diverging(tmp_path, steps=40))
    fig = learning_rate(run)
    lr_ax, mom_ax = fig.axes
    assert [ln.get_label() for ln in lr_ax.get_lines()] == ["lr/group0"]
    assert [ln.get_label() for ln in mom_ax.get_lines()] == ["lr/sgd-momentum"]
    assert lr_ax.get_ylabel() == "learning rate" and mom_ax.get_ylabel() == "momentum"


def test_counts_read_as_plain_english():
    assert count_span(1, "vanishing alert", 10, 10) == "1 vanishing alert at step 10"
    assert count_span(3, "vanishing alert", 10, 30) == "3 vanishing alerts between steps 10 and 30"


def test_long_cells_get_an_ellipsis_and_the_full_text_on_hover(tmp_path):
    tr = _fake_trainer(tmp_path)
    names = [f"model.blocks.{i}.linear.weight" for i in range(12)]
    for s in (0, 5, 10):
        _sink.log_scalars(tr, {**{f"grad/norm/{n}": 10.0 ** (i - 12) for i, n in enumerate(names)},
                               "train/loss": 2.0 / (1 + s)}, s)
    _alert(tr, "vanishing", 10, ", ".join(names), 1e-12, 1e-6, "vanishing")
    html = write_report(tmp_path).read_text()
    full = ", ".join(names)
    assert f'title="{full}"' in html and "&hellip;</span>" in html
    assert "1 vanishing alert at step 10" in html and "alert(s)" not in html
    # layer indices on the depth plot are whole numbers
    ticks = norm_vs_depth(read_run(tmp_path)).axes[0].get_xticks()
    assert np.allclose(ticks, np.round(ticks))


# ------------------------------------------------------------------ not learning, short runs


def _short_run(root: Path, lr: float, steps: int, monitor=None):
    from bpkit.task import BackpropTask

    pl.seed_everything(0, verbose=False)
    task = BackpropTask(MLP(64, 10, depth=2, width=32, activation="relu"), loss="cross_entropy",
                        optimizer=functools.partial(torch.optim.SGD, lr=lr), metrics=("acc",), num_classes=10)
    callbacks = [RunRecord()] + ([monitor] if monitor is not None else [])
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
                         default_root_dir=str(root), limit_val_batches=4, val_check_interval=10,
                         num_sanity_val_steps=0, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=64))
    return root


def test_a_short_run_at_chance_accuracy_is_not_learning(tmp_path):
    # lr=0: the weights never move, so accuracy stays at chance and the loss at ln(10); 10 steps, 2 loss logs
    run = read_run(_short_run(tmp_path / "frozen", lr=0.0, steps=10))
    acc = run.last("val/acc")
    assert acc < 0.15 and len(run.series("train/loss")[1]) == 2  # independent: what the run logged
    assert abs(run.last("train/loss") - math.log(10)) < 0.2
    found = {f.kind: f for f in diagnose(run)}
    assert "stalled" in found and "chance level" in found["stalled"].title
    assert "chance level is 0.1 (10 classes in the record" in found["stalled"].evidence[0]  # RunRecord wrote it
    # the same short run that learns is not flagged
    learning = read_run(_short_run(tmp_path / "learning", lr=0.5, steps=10))
    assert learning.last("val/acc") > 0.3
    assert "stalled" not in {f.kind for f in diagnose(learning)}


def test_chance_level_is_inferred_from_a_loss_at_ln_k_when_the_record_has_no_classes(tmp_path):
    tr = _fake_trainer(tmp_path)
    _sink.log_record(tr, "run", 0, {"event": "start", "status": "running"})
    for s in (0, 5):
        _sink.log_scalars(tr, {"train/loss": math.log(10) + 0.001 * s, "grad/norm/a.weight": 1.0}, s)
    _sink.log_scalars(tr, {"val/acc": 0.09}, 5)
    _sink.log_record(tr, "run", 5, {"event": "end", "status": "finished", "end_step": 5})
    found = {f.kind: f for f in diagnose(read_run(tmp_path))}
    assert "chance level is 0.1 (10 classes inferred" in found["stalled"].evidence[0]


def test_chance_level_from_the_number_of_classes_in_the_record(tmp_path):
    tr = _fake_trainer(tmp_path)
    _sink.log_record(tr, "run", 0, {"event": "start", "status": "running", "num_classes": 4})
    for s in (0, 5):  # a loss that drops a bit: not ln(4), so only the record's num_classes tells chance
        _sink.log_scalars(tr, {"train/loss": 0.9 - 0.001 * s, "grad/norm/a.weight": 1.0}, s)
    _sink.log_scalars(tr, {"val/acc": 0.26}, 5)
    _sink.log_record(tr, "run", 5, {"event": "end", "status": "finished", "end_step": 5})
    found = {f.kind: f for f in diagnose(read_run(tmp_path))}
    assert "4 classes in the record" in found["stalled"].evidence[0]


def test_a_50_step_run_has_histograms_in_its_report(tmp_path):
    # GradientMonitor's defaults: the first log step, then enough snapshots over a short run
    root = _short_run(tmp_path, lr=0.5, steps=50, monitor=GradientMonitor())
    run = read_run(root)
    assert run.meta.get("num_classes") == 10
    hist = run.histograms
    assert hist and all(len(h) >= 5 for h in hist.values())
    html = write_report(root).read_text()
    assert 'id="fig-grad_hist"' in html


# ------------------------------------------------------------------ sweeps and several runs


def _job(sweep: Path, name: str, overrides: list[str], acc: float, loss0: float, loss1: float):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    tr = _fake_trainer(job)
    _sink.log_record(tr, "run", 0, {"event": "start", "status": "running"})
    for s in range(0, 40, 5):
        _sink.log_scalars(tr, {"train/loss": loss0 + (loss1 - loss0) * s / 35, "grad/norm/a.weight": 1.0}, s)
    _sink.log_scalars(tr, {"val/acc": acc}, 35)
    _sink.log_record(tr, "run", 40, {"event": "end", "status": "finished", "end_step": 40})


def test_sweep_report_factors_shared_overrides_marks_the_best_and_flags_chance(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    shared = ["recipe=vanishing_depth", "trainer.max_steps=40", "data.batch_size=64"]
    _job(sweep, "0", shared + ["model.activation=sigmoid"], acc=0.1, loss0=2.31, loss1=2.30)  # at chance
    _job(sweep, "1", shared + ["model.activation=relu"], acc=0.9, loss0=2.3, loss1=0.3)
    _job(sweep, "2", shared + ["model.activation=tanh"], acc=0.7, loss0=2.3, loss1=0.8)
    html = write_report(sweep).read_text()
    assert 'Overrides shared by every job: <code>recipe=vanishing_depth trainer.max_steps=40 data.batch_size=64' \
           in html
    rows = html.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert "model.activation=sigmoid" in rows[0] and "recipe=" not in rows[0]
    assert "chance level" in rows[0] and NO_PROBLEMS not in rows[0]
    assert "&#9733; best" in rows[1] and "best" not in rows[0] + rows[2]
    assert 'id="best-job">Best job: <b>1</b> (val/acc 0.9, highest)' in html


def test_a_directory_with_several_runs_lists_and_reports_each(tmp_path, capsys):
    for v, lr in ((0, 0.0), (1, 0.5)):
        root = tmp_path / "lightning_logs" / f"version_{v}"
        tr = _fake_trainer(root)
        for s in range(0, 40, 5):
            _sink.log_scalars(tr, {"train/loss": 2.3 - lr * s / 20, "grad/norm/a.weight": 1.0}, s)
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"2 runs found under {tmp_path}")
    for v in (0, 1):
        report = tmp_path / "lightning_logs" / f"version_{v}" / "bpkit_report.html"
        assert f"{report}: " in out and report.is_file()
    html = (tmp_path / "bpkit_report.html").read_text()
    assert "lightning_logs/version_0" in html and "lightning_logs/version_1" in html
    assert "The loss is not going down" in out  # version_0 does not learn, and it is said for it
