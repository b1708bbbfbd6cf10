"""The report's findings for the newer alerts: where a NaN starts (origin), where samples mix, sharpness, saddle."""

from __future__ import annotations

from bpkit.alert import Alert
from bpkit.diagnosis.findings import diagnose
from bpkit.record import (ENTRY_ALERT, ENTRY_GRADCHECK, ENTRY_RUN, ENTRY_SCALARS, WHERE_BATCH, WHERE_HESSIAN,
                          append_entry, read_run)


def _run(tmp_path, entries):
    path = tmp_path / "bpkit_record.jsonl"
    append_entry(path, ENTRY_RUN, 0, {"event": "start", "status": "running"})
    for kind, step, data in entries:
        append_entry(path, kind, step, data)
    append_entry(path, ENTRY_RUN, 100, {"event": "end", "status": "finished"})
    return diagnose(read_run(tmp_path))


def test_the_nan_finding_says_where_it_starts(tmp_path):
    origin = "feat (backward: non-finite input gradient from a finite output gradient; samples 5)"
    alert = Alert("nonfinite", 2, "stem.0.weight", 1.0, 0.0, "NaN", origin=origin)
    (finding,) = [f for f in _run(tmp_path, [(ENTRY_ALERT, 2, alert.to_dict())]) if f.kind == "nonfinite"]
    assert f"It starts in {origin}." in finding.summary
    assert finding.remedies[0].startswith("Fix `feat` first")


def test_the_gradcheck_finding_says_where_samples_mix(tmp_path):
    where = "between `score` and `head`: ..."
    rep = {"passed": False, "rtol": 1e-3, "params": [],
           "batch_independence": {"passed": False, "origin": where, "samples": []}}
    alert = Alert("gradcheck", 0, WHERE_BATCH, 1.0, 1e-3, "mixes", origin=where)
    findings = _run(tmp_path, [(ENTRY_GRADCHECK, 0, rep), (ENTRY_ALERT, 0, alert.to_dict())])
    (finding,) = [f for f in findings if f.kind == "gradcheck"]
    assert any(f"it happens {where}" in e for e in finding.evidence)
    assert "batch" not in finding.where


def test_sharpness_and_saddle_alerts_become_findings(tmp_path):
    entries = [(ENTRY_SCALARS, s, {"curvature/sharpness_x_lr": v, "curvature/lambda_max": v / 0.5})
               for s, v in ((0, 0.4), (20, 2.3), (40, 2.1), (60, 1.9))]
    entries += [(ENTRY_ALERT, s, Alert("sharpness", s, WHERE_HESSIAN, v, 2.0, "too sharp").to_dict())
                for s, v in ((20, 2.3), (40, 2.1))]
    entries += [(ENTRY_ALERT, 0, Alert("saddle", 0, WHERE_HESSIAN, -0.48, -0.05, "saddle").to_dict())]
    findings = {f.kind: f for f in _run(tmp_path, entries)}
    assert "lambda_max x lr) reached 2.3" in findings["sharpness"].summary
    assert "2 of 4 measurements above 2" in " ".join(findings["sharpness"].evidence)
    assert "lambda_min down to -0.48" in findings["saddle"].summary
    assert findings["sharpness"].where == [] and findings["saddle"].where == []


def test_the_report_draws_the_curvature(tmp_path):
    import warnings

    from bpkit.report.write import write_report

    entries = [(ENTRY_SCALARS, s, {"curvature/sharpness_x_lr": v, "curvature/lambda_max": v / 0.5,
                                   "curvature/lambda_min": -0.1 * v, "train/loss": 1.0 / (s + 1)})
               for s, v in ((0, 0.4), (20, 2.3), (40, 2.1), (60, 1.9))]
    _run(tmp_path, entries)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layout warning from mixing the plot helpers
        out = write_report(tmp_path)
    html = out.read_text()
    assert 'id="fig-curvature"' in html and "lambda_max x lr against the stability limit 2" in html


def test_the_report_marks_unfreezing_draws_drift_and_says_the_noise_scale(tmp_path):
    from bpkit.record import ENTRY_NOISE_SCALE, ENTRY_UNFREEZE
    from bpkit.report.write import write_report

    entries = [(ENTRY_SCALARS, s, {"train/loss": 1.0 / (s + 1), "drift/blocks.0": 0.01 * s, "drift/head": 0.02 * s})
               for s in range(0, 100, 10)]
    entries += [(ENTRY_UNFREEZE, 40, {"blocks": ["blocks.1"], "trainable": ["blocks.1", "head"]})]
    sentence = "batch 64 is 11x below the critical batch ~690: a larger batch would use the same data about as " \
               "efficiently and take fewer steps"
    entries += [(ENTRY_NOISE_SCALE, 90, {"b_simple": 690.0, "batch_size": 64, "method": "split", "sentence": sentence})]
    _run(tmp_path, entries)
    run = read_run(tmp_path)
    assert run.events["unfreeze"] == [(40, {"blocks": ["blocks.1"], "trainable": ["blocks.1", "head"]})]
    html = write_report(tmp_path).read_text()
    assert 'id="fig-drift"' in html and "where layers were unfrozen" in html
    assert sentence in html

    from bpkit.diagnosis import plots

    fig = plots.loss(run, [])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "unfrozen at step 40: blocks.1" in labels


def test_the_report_draws_the_gradient_through_time(tmp_path):
    from bpkit.record import ENTRY_TEMPORAL
    from bpkit.report.write import write_report

    entries = [(ENTRY_SCALARS, s, {"train/loss": 1.0}) for s in (9, 19)]
    entries += [(ENTRY_TEMPORAL, s, {"fraction": 0.1, "modules": {"rnn": {
        "profile": [1.0, 0.1 ** (s + 1), 0.01 ** (s + 1)], "horizon": 1, "boundary": None, "last_norm": 1.0}}})
                for s in (9, 19)]
    _run(tmp_path, entries)
    html = write_report(tmp_path).read_text()
    assert 'id="fig-temporal"' in html and "Gradient through time" in html
