"""The run record's format has one home, ``bpkit/record.py``: entries written by the sink read back through it
(alerts as ``bpkit.Alert``), one reserved name for the total gradient norm (the legacy ``"total"`` still read) that
the report never counts as a layer, and the layers stay pointing downwards (checked statically)."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bpkit import Alert
from bpkit import record as R
from bpkit.callbacks import _sink
from bpkit.report import diagnose, read_run, summary_line, write_report

ROOT = Path(__file__).resolve().parents[1] / "bpkit"


def _trainer(tmp_path):
    return SimpleNamespace(loggers=[], default_root_dir=str(tmp_path), is_global_zero=True)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------ written and read back through bpkit.record

def test_every_entry_the_sink_writes_reads_back_through_bpkit_record(tmp_path):
    tr = _trainer(tmp_path)
    alerts = [Alert("vanishing", 4, "a.weight, b.weight", 1e-9, 1e-6, "vanishing"),
              Alert("nonfinite", 6, R.WHERE_TOTAL_NORM, math.inf, 0.0, "the float32 total norm overflowed"),
              Alert("spike", 7, R.WHERE_LOSS, 9.5, 4.0, "the loss spiked"),
              Alert("gradcheck", 8, R.WHERE_BATCH, 0.3, 1e-4, "batch independence failed")]
    _sink.log_record(tr, R.ENTRY_RUN, 0, {"event": "start", "status": "running"})
    _sink.log_scalars(tr, {"train/loss": 0.5, "grad/norm_total": math.nan}, 4)
    _sink.log_histograms(tr, {"grad/hist/a.weight": (np.array([1.0, 2.0]), np.array([-1.0, 0.0, 1.0]))}, 4)
    for a in alerts:
        _sink.log_alert(tr, a, warn=False)
    _sink.log_record(tr, R.ENTRY_CLIP_SUMMARY, 8, {"policy": "norm", "fraction": 0.25})
    _sink.log_record(tr, R.ENTRY_RUN, 8, {"event": "end", "status": "finished", "end_step": 8})
    path = Path(_sink.record_path(tr))
    assert path.name == R.RECORD_NAME == "bpkit_record.jsonl"

    raw = _lines(path)  # the file itself, parsed independently of bpkit.record
    entries = R.read_record(tmp_path)
    assert [(e["type"], e["step"]) for e in entries] == [(e["type"], e["step"]) for e in raw]
    assert {e["type"] for e in entries} <= set(R.ENTRY_TYPES)
    assert [e["type"] for e in entries] == ["run", "scalars", "histograms", "alert", "alert", "alert", "alert",
                                            "clip_summary", "run"]
    assert R.alerts_from(entries) == alerts  # read back as the very Alerts that were written
    assert all(isinstance(a, Alert) for a in R.alerts_from(entries))
    assert math.isnan(entries[1]["data"]["grad/norm_total"])

    run = read_run(path)
    assert run.meta["status"] == "finished" and run.bad_lines == 0 and run.entries == 9
    assert run.histograms["grad/hist/a.weight"][0].counts.tolist() == [1.0, 2.0]
    assert [a["where"] for a in run.alerts] == [a.where for a in alerts]
    assert run.clip_summaries == [{"policy": "norm", "fraction": 0.25}]


def test_a_partial_last_line_is_ended_before_the_next_entry(tmp_path):
    path = tmp_path / R.RECORD_NAME
    R.append_entry(path, R.ENTRY_SCALARS, 1, {"train/loss": 1.0})
    with open(path, "a") as f:
        f.write('{"type": "scalars", "step": 2, "da')  # killed mid-write
    R.append_entry(path, R.ENTRY_SCALARS, 3, {"train/loss": 0.5})
    assert path.read_text().count("\n") == 3
    assert [e["step"] for e in R.read_record(path)] == [1, 3]
    run = read_run(path)
    assert run.bad_lines == 1 and run.series("train/loss")[1].tolist() == [1.0, 0.5]


def test_alerts_from_skips_what_it_cannot_make_an_alert_of():
    good = Alert("dead", 3, "act1", 0.9, 0.5, "dead units").to_dict()
    entries = [{"type": "alert", "step": 3, "data": good},
               {"type": "alert", "step": 3, "data": {**good, "kind": "from_a_newer_bpkit"}},
               {"type": "alert", "step": 3, "data": {"step": 3, "where": "x"}},  # no kind
               {"type": "scalars", "step": 3, "data": {"kind": "dead"}},
               {"type": "alert", "step": 5, "data": {"kind": "spike", "where": "loss", "extra": 1}}]
    got = R.alerts_from(entries)
    assert got[0] == Alert(**good)
    assert len(got) == 2 and got[1].step == 5 and got[1].where == "loss" and math.isnan(got[1].value)


def test_the_reserved_names_are_one_each():
    assert R.WHERE_TOTAL_NORM == "total gradient norm"
    assert set(R.RESERVED_WHERE) == {R.WHERE_TOTAL_NORM, R.WHERE_LOSS, R.WHERE_BATCH, R.WHERE_HESSIAN}
    assert all(R.canonical_where(old) == R.WHERE_TOTAL_NORM for old in ("total", "grad_norm_total"))
    assert not R.is_reserved_where("model.total.weight") and R.is_reserved_where(" total ")
    with pytest.raises(ValueError, match="entry_type=3 is invalid"):
        R.format_entry(3, 0, {})


# ------------------------------------------------------------------ the report never calls a reserved name a layer

def _record_with(tmp_path, *alerts, legacy_where=None):
    """A record with a model's gradient norms and the given alerts; ``legacy_where`` rewrites the alerts' ``where``
    in the file as an older bpkit wrote it."""
    tr = _trainer(tmp_path)
    _sink.log_record(tr, R.ENTRY_RUN, 0, {"event": "start", "status": "running", "log_every_n_steps": 1})
    for s in range(4):
        _sink.log_scalars(tr, {"grad/norm/l0.weight": 1.0, "grad/norm/l1.weight": 2.0, "grad/norm_total": 3.0,
                               "train/loss": 1.0 / (s + 1)}, s)
    for a in alerts:
        _sink.log_alert(tr, a, warn=False)
    _sink.log_record(tr, R.ENTRY_RUN, 4, {"event": "end", "status": "finished", "end_step": 4})
    path = Path(_sink.record_path(tr))
    if legacy_where is not None:
        text = path.read_text().replace(f'"where": "{R.WHERE_TOTAL_NORM}"', f'"where": "{legacy_where}"')
        path.write_text(text)
    return path


@pytest.mark.parametrize("legacy", [None, "total"])
def test_a_total_norm_overflow_is_not_reported_as_a_layer(tmp_path, legacy):
    overflow = Alert("nonfinite", 2, R.WHERE_TOTAL_NORM, 1.0, 0.0, "the total gradient norm overflowed float32")
    path = _record_with(tmp_path, overflow, legacy_where=legacy)
    if legacy:
        assert '"where": "total"' in path.read_text()
    assert R.alerts_from(R.read_record(path)) == [overflow]  # the old name reads as the one reserved name
    findings = diagnose(read_run(path))
    nan = next(f for f in findings if f.kind == "nonfinite")
    assert "layer" not in nan.summary and "(total" not in nan.summary, nan.summary
    assert nan.summary.startswith("gradients or the loss became NaN/Inf, first at step 2")
    assert nan.where == []
    html = write_report(path.parent).read_text()
    assert "in 1 layer (total" not in html


@pytest.mark.parametrize("where", [R.WHERE_TOTAL_NORM, "total", "grad_norm_total"])
def test_an_exploding_total_norm_names_no_layer(tmp_path, where):
    alert = Alert("exploding", 3, R.WHERE_TOTAL_NORM, 1e6, 1e3, "the total gradient norm exploded")
    path = _record_with(tmp_path, alert, legacy_where=where if where != R.WHERE_TOTAL_NORM else None)
    boom = next(f for f in diagnose(read_run(path)) if f.kind == "exploding")
    assert "growing fastest" not in boom.summary and "layer" not in boom.summary and boom.where == []
    # a real layer in the same alert is still named
    mixed = Alert("exploding", 3, f"l1.weight, {R.WHERE_TOTAL_NORM}", 1e6, 1e3, "exploded")
    boom = next(f for f in diagnose(read_run(_record_with(tmp_path / "b", mixed))) if f.kind == "exploding")
    assert boom.where == ["l1.weight"] and "layers 2 of 2 (l1.weight)" in boom.summary


def test_a_batch_independence_alert_is_not_a_tensor(tmp_path):
    leak = Alert("gradcheck", 0, R.WHERE_BATCH, 0.4, 1e-4, "batch independence failed")
    finding = next(f for f in diagnose(read_run(_record_with(tmp_path, leak))) if f.kind == "gradcheck")
    assert finding.where == [] and "batch" not in finding.summary
    assert "Gradient check failed" in summary_line([finding])


# ------------------------------------------------------------------ the layers point downwards (statically)

def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (``from a import b`` gives ``a`` and
    ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


CALLBACKS = sorted((ROOT / "callbacks").glob("*.py"))
ENGINES = sorted([*(ROOT / "stats").glob("*.py"), *(ROOT / "detect").glob("*.py"), *(ROOT / "clip").glob("*.py"),
                  *(ROOT / "gradcheck").glob("*.py"), *(ROOT / "probe").glob("*.py"),
                  *(ROOT / "diagnosis").glob("*.py"), ROOT / "schedules.py",
                  ROOT / "record.py", ROOT / "alert.py", ROOT / "errors.py"])


@pytest.mark.parametrize("path", CALLBACKS, ids=lambda p: p.name)
def test_no_callback_imports_the_report_or_the_app(path):
    bad = [m for m in _imports(path) if _under(m, "bpkit.report", "bpkit.train") or m in ("bpkit.report",)]
    assert not bad, f"{path.name} imports {bad}: callbacks sit below the report and the Hydra app"


@pytest.mark.parametrize("path", ENGINES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_engines_import_neither_lightning_nor_upper_layers(path):
    bad = [m for m in _imports(path)
           if _under(m, "lightning", "pytorch_lightning", "bpkit.callbacks", "bpkit.report", "bpkit.train")]
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}"


def test_the_record_format_is_the_ground_floor():
    allowed_bpkit = {"bpkit.alert", "bpkit.errors"}
    got = _imports(ROOT / "record.py")
    ours = {m for m in got if _under(m, "bpkit")}
    assert {m.rsplit(".", 1)[0] if m.rsplit(".", 1)[0] in allowed_bpkit else m for m in ours} <= allowed_bpkit, ours
    third_party = {m.split(".")[0] for m in got} - {"bpkit", "numpy", "__future__"}
    assert third_party <= set(sys.stdlib_module_names), third_party


def test_the_record_names_are_defined_once():
    """``bpkit_record.jsonl`` and the reserved names are spelled out in bpkit/record.py only."""
    spelled = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("bpkit_record.jsonl", "total gradient norm"):
                spelled.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.value!r}")
    assert not spelled, spelled


@pytest.mark.parametrize("path", CALLBACKS, ids=lambda p: p.name)
def test_no_callback_uses_another_modules_private_names(path):
    """A callback may import the shared plumbing modules of its own package (``bpkit.callbacks._sink``, ...), but
    no private name of any module (``_sink._helper``, ``from bpkit.stats.grads import _x``)."""
    tree = ast.parse(path.read_text())
    plumbing = {p.stem for p in (ROOT / "callbacks").glob("_*.py")}
    modules: set[str] = set()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bpkit"):
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if private and not (node.module == "bpkit.callbacks" and a.name in plumbing):
                    bad.append(f"line {node.lineno}: from {node.module} import {a.name}")
                modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("bpkit")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, f"{path.name} uses private names: {bad}"
