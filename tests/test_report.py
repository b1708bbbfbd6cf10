"""bpkit-report and RunRecord: diagnoses of real planted problems, robust reading, bad input, sweeps."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from bpkit import Alert, BpkitConfigError
from bpkit.callbacks import ActivationMonitor, GradientMonitor, RunRecord, _sink
from bpkit.data import AddingDataModule, DigitsDataModule
from bpkit.models import MLP, RNN
from bpkit.report import NO_PROBLEMS, diagnose, read_run, write_report
from bpkit.report.cli import main as report_main
from bpkit.report.findings import describe_layers
from tests.hostreads import HostReadCounter

warnings.filterwarnings("ignore", ".*bpkit.*")


def _fit(root: Path, model, datamodule, callbacks, steps: int, loss: str = "cross_entropy", lr: float = 1e-3,
         optimizer=torch.optim.Adam, logger=False, val_every: int = 10):
    from bpkit.task import BackpropTask

    pl.seed_everything(0, verbose=False)
    metrics = ("acc",) if loss == "cross_entropy" else ()
    task = BackpropTask(model, loss=loss, optimizer=functools.partial(optimizer, lr=lr), metrics=metrics,
                        num_classes=10 if loss == "cross_entropy" else None)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
                         default_root_dir=str(root), limit_val_batches=2, val_check_interval=val_every,
                         num_sanity_val_steps=0, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, datamodule=datamodule)
    return trainer, task


def _findings(run_dir: Path) -> dict:
    return {f.kind: f for f in diagnose(read_run(run_dir))}


# ------------------------------------------------------------------ real runs, shared by several tests

@pytest.fixture(scope="module")
def vanishing_run(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vanishing")
    model = MLP(64, 10, depth=20, width=64, activation="sigmoid")
    _, task = _fit(root, model, DigitsDataModule(batch_size=64),
                   [GradientMonitor(histogram_every_n_steps=5), RunRecord()], steps=30)
    return root, task


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("healthy")
    model = MLP(64, 10, depth=3, width=32, activation="relu")
    _fit(root, model, DigitsDataModule(batch_size=64),
         [GradientMonitor(histogram_every_n_steps=5), ActivationMonitor(), RunRecord()],
         steps=40, val_every=20)
    return root


def _float64_grad_ratios(task, datamodule) -> dict[str, float]:
    """Reference: each weight matrix's gradient norm over the largest one, by float64 autograd on a batch."""
    model = copy.deepcopy(task.model).double()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    loss = torch.nn.functional.cross_entropy(model(x.double()), y)
    loss.backward()
    norms = {f"model.{n}": p.grad.norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
    top = max(norms.values())
    return {n: v / top for n, v in norms.items()}


def test_vanishing_report_names_the_layers_and_the_remedies(vanishing_run):
    root, task = vanishing_run
    found = _findings(root)
    assert "vanishing" in found, list(found)
    f = found["vanishing"]
    reference = _float64_grad_ratios(task, DigitsDataModule(batch_size=64))
    # every layer the report names really gets < 1e-3 of the largest gradient (independent float64 check),
    # and the input layer, the deepest victim, is named
    assert f.where and all(reference[n] < 1e-3 for n in f.where), {n: reference[n] for n in f.where}
    assert "model.blocks.0.linear.weight" in f.where
    assert "layers 1-" in f.summary and "model.blocks.0.linear.weight" in f.summary
    remedies = " ".join(f.remedies)
    for word in ("ReLU", "LeakyReLU", "He (Kaiming)", "Xavier", "normalization", "residual"):
        assert word in remedies
    assert f.remedies[0].startswith("Replace sigmoid/tanh")  # the model is sigmoid: the activation comes first
    html = write_report(root).read_text()
    assert "Vanishing gradients" in html and "model.blocks.0.linear.weight" in html
    assert NO_PROBLEMS not in html
    assert 'id="fig-gradient_flow"' in html and 'id="fig-update_ratio"' in html and 'id="fig-loss"' in html


def test_healthy_run_report_says_no_problems_found(healthy_run):
    run = read_run(healthy_run)
    assert diagnose(run) == []
    assert run.status == "finished"
    steps, loss = run.series("train/loss")
    assert len(loss) == 8 and loss[-1] < loss[0]  # it did learn: the verdict is not vacuous
    html = write_report(healthy_run).read_text()
    assert NO_PROBLEMS in html
    for fig in ("loss", "gradient_flow", "norm_vs_depth", "update_ratio", "grad_hist", "weight_hist", "act_hist",
                "lr"):
        assert f'id="fig-{fig}"' in html, fig
        assert (healthy_run / "bpkit_report_files" / f"{fig}.png").stat().st_size > 5000


def test_exploding_rnn_report(tmp_path):
    torch.manual_seed(0)
    model = RNN("rnn_tanh", input_size=2, hidden_size=32, out_features=1, recurrent_scale=2.0)
    dm = AddingDataModule(seq_len=30, num_train=640, batch_size=32)
    _fit(tmp_path, model, dm, [GradientMonitor(), RunRecord()], steps=40, loss="mse", lr=0.05,
         optimizer=torch.optim.SGD)
    run = read_run(tmp_path)
    found = _findings(tmp_path)
    assert "exploding" in found, list(found)
    f = found["exploding"]
    steps, norms = run.series("grad/norm_total")
    assert norms.max() > 100 * norms[0]  # the logged norm itself grew by orders of magnitude
    assert "Clip gradients" in f.remedies[0] or "Clip gradients" in f.remedies[1]
    assert any("spectral radius" in r for r in f.remedies)  # a recurrent model gets the RNN-specific remedy


def test_dead_units_report(tmp_path):
    torch.manual_seed(0)
    model = MLP(64, 10, depth=4, width=64, activation="relu")
    with torch.no_grad():
        for block in model.blocks:
            block.linear.bias.fill_(-10.0)
    _, task = _fit(tmp_path, model, DigitsDataModule(batch_size=64), [ActivationMonitor(), RunRecord()], steps=30)
    found = _findings(tmp_path)
    assert "dead" in found, list(found)
    f = found["dead"]
    # reference: the named modules output zero for every sample of a batch (forward hooks, no bpkit code)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    outs = {}
    modules = dict(task.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in f.where]
    task(x)
    for h in handles:
        h.remove()
    for name in f.where:
        assert (outs[name] == 0).all(0).float().mean() > 0.5, name
    assert "LeakyReLU" in f.remedies[0] and any("He (Kaiming)" in r for r in f.remedies)
    assert f.summary.startswith("units that output exactly zero")


# ------------------------------------------------------------------ a run still going, a run that crashed

class _ReportMidway(Callback):
    def __init__(self, at: int) -> None:
        self.at, self.report = at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and self.report is None:
            self.report = write_report(trainer.default_root_dir, Path(trainer.default_root_dir) / "midway.html")
            self.run = read_run(trainer.default_root_dir)


def test_report_on_a_run_still_going(tmp_path):
    probe = _ReportMidway(at=15)
    _fit(tmp_path, MLP(64, 10, depth=2, width=32), DigitsDataModule(batch_size=64),
         [GradientMonitor(), RunRecord(), probe], steps=25)
    assert probe.run.status == "running"
    html = probe.report.read_text()
    assert "still going" in html and 'id="fig-gradient_flow"' in html
    assert read_run(tmp_path).status == "finished"


class _Boom(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 12:
            raise RuntimeError("planted failure at step 12")


def test_report_on_a_crashed_run_with_a_truncated_last_line(tmp_path):
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(tmp_path, MLP(64, 10, depth=2, width=32), DigitsDataModule(batch_size=64),
             [GradientMonitor(), RunRecord(), _Boom()], steps=40)
    record = tmp_path / "bpkit_record.jsonl"
    with open(record, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"type": "scalars", "step": 13, "data": {"grad/norm_total": 0.')
    run = read_run(tmp_path)
    assert run.status == "crashed" and run.truncated and run.bad_lines == 1
    assert run.meta["end_step"] == 12 and "planted failure at step 12" in run.meta["error"]
    crashed = _findings(tmp_path)["crashed"]
    assert "planted failure at step 12" in crashed.summary
    html = write_report(tmp_path).read_text()
    assert "The run crashed" in html and "cut short" in html and 'id="fig-gradient_flow"' in html


# ------------------------------------------------------------------ bad input

def test_bad_input_fails_with_a_clear_message_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(BpkitConfigError, match=r"run_dir='.*nope' is invalid: expected an existing run directory"):
        write_report(missing)
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    with pytest.raises(BpkitConfigError, match=r"not_a_run' is invalid: expected a bpkit run directory: no "
                                               r"bpkit_record.jsonl"):
        write_report(not_a_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bpkit_record.jsonl").write_text("")
    with pytest.raises(BpkitConfigError, match=r"empty' is invalid: expected a run with logged data: .* has no entry"):
        write_report(empty)
    (empty / "bpkit_record.jsonl").write_text('{"type": "scal')  # only a cut-off first line
    with pytest.raises(BpkitConfigError, match="has no entry"):
        read_run(empty)
    assert report_main([str(not_a_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpkit-report: error: run_dir=") and str(not_a_run) in err
    with pytest.raises(BpkitConfigError, match="log_every_n_steps=-1 is invalid: expected an integer >= 0"):
        RunRecord(log_every_n_steps=-1)


# ------------------------------------------------------------------ the record, through the sink

def _fake_trainer(root: Path, step: int = 0):
    return SimpleNamespace(log_dir=str(root), default_root_dir=str(root), loggers=[], is_global_zero=True,
                           global_step=step)


def test_record_written_by_the_sink_reads_back_and_renders(tmp_path, capsys):
    tr = _fake_trainer(tmp_path)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=34)
    edges = np.concatenate([[-np.inf], np.arange(-12, 4.5, 0.5), [np.inf]])
    for step in (10, 20, 30):
        _sink.log_scalars(tr, {"grad/norm/a.weight": 0.1 * step, "grad/norm/b.weight": 1e-9, "grad/norm_total": 1.0,
                               "clip/norm_pre": 3.0, "clip/norm_post": 1.0, "clip/threshold": 1.0,
                               "clip/clipped": 0.5, "lr/group0": 1e-3 / step}, step)
        _sink.log_histograms(tr, {"grad/hist/a.weight": (counts, edges)}, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sink.log_alert(tr, Alert("spike", 20, "loss", 9.5, 4.0, "the loss spiked"))
    report = {"passed": False, "mode": "directional", "eps": 1e-6, "rtol": 1e-3, "atol": 1e-8, "dtype": "float64",
              "max_rel_error": 0.5, "params": [
                  {"name": "a.weight", "shape": [3, 2], "numel": 6, "probes": 3, "grad_norm": 1.0,
                   "max_abs_error": 0.5, "rel_error": 0.5, "passed": False, "reason": ""},
                  {"name": "b.weight", "shape": [2], "numel": 2, "probes": 2, "grad_norm": 2.0,
                   "max_abs_error": 1e-9, "rel_error": 1e-9, "passed": True, "reason": ""}]}
    _sink.log_record(tr, "gradcheck", 0, report)
    run = read_run(tmp_path)
    steps, values = run.series("grad/norm/a.weight")
    assert steps.tolist() == [10, 20, 30] and np.allclose(values, [1.0, 2.0, 3.0])
    hist = run.histograms["grad/hist/a.weight"][1]
    assert hist.step == 20 and hist.counts.tolist() == counts.tolist() and np.isinf(hist.edges[[0, -1]]).all()
    assert run.alerts[0]["kind"] == "spike" and run.gradchecks[0][1]["params"][0]["name"] == "a.weight"
    kinds = [f.kind for f in diagnose(run)]
    assert kinds == ["gradcheck", "spike"]  # most urgent first
    html = write_report(tmp_path).read_text()
    for fig in ("gradient_flow", "clipping", "lr", "grad_hist"):
        assert f'id="fig-{fig}"' in html
    assert "<h2>Gradient check</h2>" in html and "FAILED" in html and html.count("data:image/png;base64,") >= 5
    assert report_main([str(tmp_path), "--out", str(tmp_path / "r.html"), "--print"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'r.html'}: Gradient check failed") and "1. " in out
    assert (tmp_path / "r_files" / "gradient_flow.png").is_file()


def test_describe_layers_counts_weights_as_layers():
    order = [f"l{i}.weight" for i in range(5)] + ["l4.bias"]
    assert describe_layers(["l0.weight", "l1.weight", "l3.weight"], order) == \
        "layers 1-2, 4 of 5 (l0.weight, l1.weight, l3.weight)"


# ------------------------------------------------------------------ RunRecord

class _Tiny(pl.LightningModule):
    """Hand-written: no bpkit code runs on the step but the callback under test."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
                                                 "interval": "step"}}


def _tiny_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def test_run_record_logs_loss_and_lr_with_no_host_read_off_the_log_steps(tmp_path):
    record = RunRecord(log_every_n_steps=5)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[record])
    losses = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step] = float(outputs["loss"])

    trainer.callbacks.append(Spy())
    with HostReadCounter() as reads:
        trainer.fit(_Tiny(), train_dataloaders=_tiny_loader())
    # two log batches (Lightning's rule: steps 4 and 9, where Lightning logs their train/loss): one packed copy
    # each, nothing on the other ten steps, and one at the end of training (the returned losses of steps 10-11)
    assert reads.count == 3 and all("stats/readback.py" in s for s in reads.sites), reads.sites
    run = read_run(tmp_path)
    steps, loss = run.series("train/loss")
    # the batch of step s ends with global_step s + 1 (the Spy's key)
    assert steps.tolist() == [4, 9] and np.allclose(loss, [losses[5], losses[10]])
    assert np.allclose(run.series("loss/train_returned")[1], loss)  # the same loss, returned by training_step
    lr_steps, lr = run.series("lr/group0")
    assert np.allclose(lr, [0.1 * 0.5 ** (s // 4) for s in lr_steps])  # StepLR by hand
    assert run.meta["status"] == "finished" and run.meta["activations"] == ["Tanh"] and run.meta["num_params"] == 49


def test_run_record_wandb_offline_image_and_no_alert(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="bpkit-test", save_dir=str(tmp_path), offline=True)
    record = RunRecord()
    _fit(tmp_path, MLP(64, 10, depth=12, width=32, activation="sigmoid"), DigitsDataModule(batch_size=64),
         [GradientMonitor(), record], steps=20, logger=logger)
    import wandb

    run_dir = Path(wandb.run.dir).parent if wandb.run is not None else None
    wandb.finish()
    assert record.alerts_sent == []  # offline: never wandb.alert
    run = read_run(tmp_path)
    assert "report/gradient_flow" in run.images and Path(run.images["report/gradient_flow"]).is_file()
    assert list((run_dir / "files" / "media" / "images" / "report").glob("gradient_flow_*.png"))

    class OnlineRun:  # the W&B run object as an online run exposes it
        offline = False
        settings = SimpleNamespace(mode="online")
        sent = []

        def alert(self, title, text, level):
            self.sent.append((title, text, level))

    online = type("WandbLogger", (), {"experiment": OnlineRun()})()
    findings = diagnose(run)
    assert findings and record.send_alerts(SimpleNamespace(loggers=[online]), findings) == len(findings)
    assert [t for t, _, _ in OnlineRun.sent] == [f"bpkit: {f.title}" for f in findings]
    assert OnlineRun.sent[0][1] == findings[0].text() and OnlineRun.sent[0][2] == "WARN"


# ------------------------------------------------------------------ sweeps

def test_multirun_comparison_one_row_per_job(tmp_path, vanishing_run, healthy_run):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, src, overrides in (("0", vanishing_run[0], ["model.activation=sigmoid", "model.depth=20"]),
                                ("1", healthy_run, ["model.activation=relu", "model.depth=3"]),
                                ("2", None, ["model.depth=-1"])):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if src is not None:
            shutil.copy(src / "bpkit_record.jsonl", sweep / job / "bpkit_record.jsonl")
    (sweep / "bpkit_sweep.jsonl").write_text(json.dumps({"job": 2, "overrides": ["model.depth=-1"], "status": "failed",
                                                         "error": "BpkitConfigError: model.depth=-1 is invalid"}) + "\n")
    html = write_report(sweep).read_text()
    rows = html.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert len(rows) == 3
    assert "model.activation=sigmoid model.depth=20" in rows[0] and "Vanishing gradients" in rows[0]
    assert "model.activation=relu model.depth=3" in rows[1] and NO_PROBLEMS in rows[1]
    assert "failed" in rows[2] and "model.depth=-1 is invalid" in rows[2]
    acc = read_run(healthy_run).last("val/acc")
    assert f"{acc:.4g}" in rows[1]
    assert 'id="fig-sweep_loss"' in html


@pytest.mark.slow
def test_bpkit_train_sweep_offline_wandb_has_histograms_and_image_and_the_report_compares_jobs(tmp_path):
    import subprocess
    import sys

    from tests.test_train_cli import FAST, bpkit_train

    sweep = tmp_path / "sweep"
    proc = bpkit_train(["-m", *FAST, "trainer.limit_train_batches=10", "trainer.log_every_n_steps=2",
                        "model.depth=3", "model.activation=sigmoid,relu",
                        "++callbacks.gradient_monitor._target_=bpkit.callbacks.GradientMonitor",
                        "++callbacks.gradient_monitor.histogram_every_n_steps=2",
                        "++callbacks.run_record._target_=bpkit.callbacks.RunRecord", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        (run_dir,) = sorted((sweep / job / "wandb").glob("offline-run-*"))
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:  # older wandb: no `python -m wandb`; the CLI entry point is the same code
            out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary",
                                  "--json", str(run_dir)], capture_output=True, text=True, timeout=120)
        summary = json.loads(out.stdout)["summary"]
        hists = [k for k, v in summary.items() if k.startswith("grad/hist/") and v.get("_type") == "histogram"]
        assert len(hists) == 6, sorted(summary)  # 3 Linear layers x (weight, bias)
        assert summary["report/gradient_flow"]["_type"].startswith("images")
        assert "grad/norm_total" in summary and "lr/group0" in summary
    report = subprocess.run([sys.executable, "-m", "bpkit.report.cli", str(sweep)], capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    html = (sweep / "bpkit_report.html").read_text()
    assert "model.activation=sigmoid" in html and "model.activation=relu" in html
    assert html.count('<span class="good">finished</span>') == 2
