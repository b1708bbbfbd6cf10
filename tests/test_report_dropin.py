"""bpkit-report on records as other projects and other callbacks leave them: malformed but valid-JSON lines,
a directory at the record's path, parameter names matplotlib's mathtext cannot parse, clipping summaries,
unused parameters, and the last steps GradientMonitor writes when training raises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpkit.report import NO_PROBLEMS, diagnose, read_run, write_report
from bpkit.report.cli import main as report_main
from bpkit.report.html import interventions_html

EDGES = list(np.arange(-4, 1.5, 0.5))


def write(root: Path, entries, raw_lines=()):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "bpkit_record.jsonl", "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return root


def healthy(names=("a.weight", "b.weight"), steps=range(0, 40, 4), hist=True):
    out = [{"type": "run", "step": 0, "data": {"event": "start", "status": "running", "log_every_n_steps": 4}}]
    for s in steps:
        out.append({"type": "scalars", "step": s, "data": {**{f"grad/norm/{n}": 1.0 + 0.01 * s for n in names},
                                                           "grad/norm_total": 1.4, "train/loss": 2.0 / (1 + s)}})
        if hist:
            out.append({"type": "histograms", "step": s, "data": {f"grad/hist/{names[0]}": {
                "counts": list(range(len(EDGES) - 1)), "edges": EDGES}}})
    out.append({"type": "run", "step": 40, "data": {"event": "end", "status": "finished", "end_step": 40}})
    return out


BAD = {
    "step_null": '{"type": "scalars", "step": null, "data": {"train/loss": 1.0}}',
    "step_string": '{"type": "scalars", "step": "12", "data": {"train/loss": 1.0}}',
    "step_huge": '{"type": "scalars", "step": 1e400, "data": {"train/loss": 1.0}}',
    "counts_number": '{"type": "histograms", "step": 8, "data": {"grad/hist/a.weight": {"counts": 5, '
                     '"edges": [0, 1]}}}',
    "counts_2d": '{"type": "histograms", "step": 8, "data": {"grad/hist/a.weight": {"counts": [[1, 2]], "edges": '
                 '[0, 1, 2]}}}',
    "value_string": '{"type": "scalars", "step": 8, "data": {"train/loss": "abc"}}',
    "alert_step_list": '{"type": "alert", "step": 3, "data": {"kind": "spike", "step": [3], "where": "loss"}}',
    "data_list": '{"type": "run", "step": 0, "data": [1, 2]}',
    "gradcheck_params": '{"type": "gradcheck", "step": 0, "data": {"passed": false, "params": 3}}',
    "not_an_object": '[1, 2, 3]',
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_malformed_line_is_skipped_and_counted(tmp_path, kind):
    root = write(tmp_path, healthy(), [BAD[kind]])
    run = read_run(root)
    assert run.bad_lines == 1 and run.status == "finished"
    assert len(run.series("train/loss")[1]) == 10  # the good lines are all there, no NaN from the bad value
    assert len(run.histograms["grad/hist/a.weight"]) == 10 and run.alerts == [] and run.gradchecks == []
    assert diagnose(run) == []


def test_the_cli_writes_the_report_of_a_record_with_every_kind_of_bad_line(tmp_path, capsys):
    root = write(tmp_path, healthy(), list(BAD.values()))
    assert report_main([str(root)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(NO_PROBLEMS) and out.err == ""
    assert f"{len(BAD)} unreadable line(s) in the record were skipped" in (root / "bpkit_report.html").read_text()


def test_a_line_with_garbage_before_an_entry_keeps_the_entry(tmp_path):
    cut = '{"type": "scalars", "step": 13, "data": {"grad/norm_total": 0.'
    start = json.dumps({"type": "run", "step": 5, "data": {"event": "start", "resumed_at_step": 5}})
    run = read_run(write(tmp_path, healthy(), [cut + start]))
    assert run.meta["resumed_at_step"] == 5 and run.bad_lines == 1


def test_a_directory_named_like_the_record_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "run" / "bpkit_record.jsonl").mkdir(parents=True)
    assert report_main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bpkit-report: error: run_dir=") and "is a directory" in err[0]
    assert report_main([str(tmp_path / "run" / "bpkit_record.jsonl")]) == 2
    assert "directory" in capsys.readouterr().err


def test_mathtext_in_parameter_names_is_drawn_as_plain_text(tmp_path):
    names = ("$x^$.weight", "layer_$1$.weight")
    root = write(tmp_path, healthy(names) + [{"type": "scalars", "step": s, "data": {f"update/ratio/{n}": 1e-3
                                                                                      for n in names}}
                                              for s in (4, 8)])
    html = write_report(root).read_text()
    for fig in ("gradient_flow", "norm_vs_depth", "update_ratio", "grad_hist", "loss"):
        assert f'id="fig-{fig}"' in html, fig
        assert (root / "bpkit_report_files" / f"{fig}.png").stat().st_size > 3000


def _clip(fraction, message=None):
    return {"type": "clip_summary", "step": 40, "data": {
        "policy": "norm", "optimizer": 0, "steps": 100, "clipped": int(100 * fraction), "fraction": fraction,
        "typical_norm": 8.5, "bound": 1.0, "message": message}}


def test_clipping_most_steps_is_a_finding_and_every_intervention_shows_its_fraction(tmp_path):
    msg = "GradientClipping(norm): clipped 92% of 100 steps: the bound is below the typical norm"
    run = read_run(write(tmp_path / "a", healthy(hist=False) + [_clip(0.92, "bpkit " + msg)]))
    (f,) = [f for f in diagnose(run) if f.kind == "clipping"]
    assert msg in f.summary and "92 of 100" in f.evidence[0] and "8.5" in f.remedies[0]
    html = write_report(tmp_path / "a").read_text()
    assert "<h2>Interventions</h2>" in html and "92%" in html
    calm = read_run(write(tmp_path / "b", healthy(hist=False) + [_clip(0.1)]))
    assert diagnose(calm) == [] and ">10%<" in interventions_html(calm)
    no_message = read_run(write(tmp_path / "c", healthy(hist=False) + [_clip(0.75)]))
    (f,) = [f for f in diagnose(no_message) if f.kind == "clipping"]
    assert f.summary == ("GradientClipping(norm) clipped 75% of steps: the bound is below the typical norm; this "
                         "rescales every update.")


def _alert(kind, where, step=8, value=1e-9):
    return {"type": "alert", "step": step, "data": {"kind": kind, "step": step, "where": where, "value": value,
                                                    "threshold": 1e-3, "message": f"{kind} {where}"}}


def test_unused_parameters_have_their_own_heading_and_are_not_vanishing(tmp_path):
    entries = healthy(("a.weight", "b.weight", "c.weight"), hist=False) + [
        _alert("unused", "c.weight", value=0.0),
        _alert("vanishing", "a.weight, c.weight"),
        _alert("vanishing", "c.weight", step=12),
        _alert("dead", "c", value=1.0)]
    run = read_run(write(tmp_path, entries))
    found = {f.kind: f for f in diagnose(run)}
    assert found["unused"].title == "Unused parameters" and found["unused"].where == ["c.weight"]
    remedies = " ".join(found["unused"].remedies)
    assert "LeakyReLU" not in remedies and "He (Kaiming)" not in remedies
    assert found["vanishing"].where == ["a.weight"]  # c.weight is explained by the unused alert
    assert "dead" not in found  # module c owns c.weight: explained too
    html = write_report(tmp_path).read_text()
    assert html.count("<h3>Unused parameters") == 1


def test_the_last_steps_of_both_writers_merge_in_the_crash_finding(tmp_path):
    start = {"type": "run", "step": 0, "data": {"event": "start", "status": "running", "log_every_n_steps": 50}}
    gm = {"type": "last_steps", "step": 2, "data": {"steps": [0, 1], "loss": [0.9, None], "grad_norm_total": [3.5, 1e9],
                                                    "nonfinite": [False, True], "exception": "ValueError: boom"}}
    rr = {"type": "last_steps", "step": 2, "data": {"steps": [0, 1], "loss": [0.9, 0.8], "nonfinite": [False, False],
                                                    "exception": "ValueError: boom", "lr": {"lr/group0": 0.1},
                                                    "source": "RunRecord"}}
    end = {"type": "run", "step": 2, "data": {"event": "end", "status": "crashed", "end_step": 2,
                                              "error": "ValueError: boom"}}
    run = read_run(write(tmp_path, [start, gm, rr, end]))
    assert run.last_steps == {0: {"loss": 0.9, "grad_norm_total": 3.5, "nonfinite": False},
                              1: {"loss": 0.8, "grad_norm_total": 1e9, "nonfinite": True}}
    crashed = diagnose(run)[0]
    assert crashed.kind == "crashed"
    assert crashed.summary.startswith("the run stopped with ValueError: boom at step 2; the last steps: step 0: "
                                      "loss 0.9, grad norm 3.5; step 1: loss 0.8, grad norm 1e+09, non-finite")
    html = write_report(tmp_path).read_text()
    assert "The last steps before the crash" in html and "no problems can be ruled out" in html
