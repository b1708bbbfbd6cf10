"""GradualUnfreeze, BackboneUnfreeze and WeightDrift in a real Lightning Trainer, with GradientMonitor and
GradientClipping: the unfreezing schedule, named groups and LRs, the `unfreeze` record entries, no vanishing alert
and no per-layer scalars for frozen layers, newly unfrozen layers measured (against float64) and clipped from their
first step, and a resume in the middle of a gradual unfreeze."""

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bpkit.callbacks import GradientClipping, GradientMonitor
from bpkit.callbacks.finetuning import BackboneUnfreeze, GradualUnfreeze
from bpkit.callbacks.weight_drift import ENTRY_UNFREEZE, WeightDrift
from bpkit.data import DigitsDataModule
from bpkit.finetune import FinetuneSpec, GroupedOptimizer
from bpkit.models import MLP
from bpkit.record import RECORD_NAME, read_record
from bpkit.task import BackpropTask

BATCHES = 3  # optimizer steps per epoch
BLOCK_PARAMS = {b: [f"model.{b}.linear.weight", f"model.{b}.linear.bias"] for b in ("blocks.0", "blocks.1", "blocks.2")}


def _task(mode, lr=0.1, momentum=0.9):
    torch.manual_seed(0)
    model = MLP(64, 10, depth=4, width=16)
    opt = GroupedOptimizer(functools.partial(torch.optim.SGD, lr=lr, momentum=momentum), model, FinetuneSpec(mode=mode))
    return BackpropTask(model, "cross_entropy", opt, num_classes=10)


def _trainer(root, callbacks, max_epochs, **kw):
    return pl.Trainer(max_epochs=max_epochs, limit_train_batches=BATCHES, limit_val_batches=0, logger=False,
                      callbacks=callbacks, default_root_dir=str(root), log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=kw.pop("enable_checkpointing", False), num_sanity_val_steps=0, **kw)


def _entries(root, kind):
    return [e for e in read_record(Path(root) / RECORD_NAME) if e["type"] == kind]


class _Trainable(pl.Callback):
    """Which parameters require a gradient at each training batch, and the optimizer's groups."""

    def __init__(self):
        self.by_step, self.groups = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.by_step[step] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.groups[step] = [(g.get("name"), g["lr"], len(g["params"])) for g in trainer.optimizers[0].param_groups]


def test_gradual_unfreezes_one_block_per_epoch_from_the_top(tmp_path):
    seen = _Trainable()
    task = _task("gradual")
    trainer = _trainer(tmp_path, [GradualUnfreeze(unfreeze_epoch=1, lr_factor=0.5), WeightDrift(), seen], 4)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    head = ["model.head.bias", "model.head.weight"]
    expect = {0: head, 3: sorted(head + BLOCK_PARAMS["blocks.2"]),
              6: sorted(head + BLOCK_PARAMS["blocks.2"] + BLOCK_PARAMS["blocks.1"]), 9: sorted(
                  head + BLOCK_PARAMS["blocks.2"] + BLOCK_PARAMS["blocks.1"] + BLOCK_PARAMS["blocks.0"])}
    for step, names in expect.items():
        assert seen.by_step[step] == names, step
        assert seen.by_step[step + 2] == names  # and for the whole epoch
    assert seen.groups[9] == [("head", 0.1, 2), ("blocks.2", pytest.approx(0.05), 2),
                              ("blocks.1", pytest.approx(0.025), 2), ("blocks.0", pytest.approx(0.0125), 2)]
    events = _entries(tmp_path, ENTRY_UNFREEZE)
    assert [(e["step"], e["data"]["blocks"], e["data"]["epoch"]) for e in events] == \
        [(3, ["blocks.2"], 1), (6, ["blocks.1"], 2), (9, ["blocks.0"], 3)]
    assert events[0]["data"]["frozen"] == ["blocks.0", "blocks.1"]
    assert events[0]["data"]["params"] == BLOCK_PARAMS["blocks.2"]
    # drift: frozen blocks have not moved, the head has
    drift = {e["step"]: e["data"] for e in _entries(tmp_path, "scalars") if "drift/head" in e["data"]}
    assert drift[2]["drift/blocks.0"] == 0.0 and drift[2]["drift/head"] > 0
    assert drift[5]["drift/blocks.2"] > 0 and drift[5]["drift/blocks.1"] == 0.0


def test_backbone_unfreeze_is_lightnings_schedule_on_bpkit_blocks(tmp_path):
    seen = _Trainable()
    trainer = _trainer(tmp_path, [BackboneUnfreeze(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1),
                                  WeightDrift(), seen], 4)
    trainer.fit(_task("backbone"), datamodule=DigitsDataModule(batch_size=32))
    assert seen.groups[0] == [("head", 0.1, 2)]
    assert seen.groups[3] == [("head", 0.1, 2), ("backbone", pytest.approx(0.01), 6)]
    assert seen.groups[6][1][1] == pytest.approx(0.02)  # Lightning's default: x2 per epoch, up to the head's LR
    assert seen.groups[9][1][1] == pytest.approx(0.04)
    events = _entries(tmp_path, ENTRY_UNFREEZE)
    assert [(e["step"], e["data"]["blocks"]) for e in events] == [(3, ["blocks.0", "blocks.1", "blocks.2"])]


class _GradNorms(pl.Callback):
    """float64 norms of every gradient in on_before_optimizer_step (where it sits in the callback list)."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step] = {n: float(p.grad.double().norm()) for n, p in pl_module.named_parameters()
                                           if p.grad is not None}


def test_monitor_and_clipping_see_newly_unfrozen_layers_and_never_frozen_ones(tmp_path):
    pre, post = _GradNorms(), _GradNorms()
    monitor = GradientMonitor(log_every_n_steps=1, histograms=False, update_ratio=False, check_every_n_steps=1,
                              vanishing={"rel_max": 1.0, "rel_weight": 1.0, "patience": 1}, exploding=False,
                              spike=False)
    max_norm = 0.05
    clip = GradientClipping("norm", max_norm=max_norm, log_every_n_steps=1)
    trainer = _trainer(tmp_path, [GradualUnfreeze(unfreeze_epoch=1), WeightDrift(), pre, monitor, clip, post], 4)
    trainer.fit(_task("gradual"), datamodule=DigitsDataModule(batch_size=32))
    unfrozen_at = {"blocks.2": 3, "blocks.1": 6, "blocks.0": 9}

    def first_step(name):
        block = next((b for b in unfrozen_at if f".{b}." in name), None)
        return 0 if block is None else unfrozen_at[block]

    # no vanishing alert on a frozen tensor (the rule is set to flag every weight but the largest: it does fire)
    vanishing = [a for a in monitor.alerts if a.kind == "vanishing"]
    assert vanishing
    assert all(a.step >= first_step(a.where) for a in vanishing), [(a.where, a.step) for a in vanishing]
    assert any(a.step == first_step(a.where) and first_step(a.where) > 0 for a in vanishing)
    # per-layer scalars: frozen tensors left out, newly unfrozen ones there from their first step, equal to float64
    scalars = {}
    for e in _entries(tmp_path, "scalars"):
        scalars.setdefault(e["step"], {}).update(e["data"])
    for name in [n for ns in BLOCK_PARAMS.values() for n in ns] + ["model.head.weight"]:
        key = f"grad/norm/{name}"
        logged = sorted(s for s, d in scalars.items() if key in d)
        assert logged == list(range(first_step(name), 4 * BATCHES)), name
        s0 = first_step(name)
        assert scalars[s0][key] == pytest.approx(pre.norms[s0][name], rel=1e-5)
    # clipped from their first step: after clipping the total norm is max_norm, every gradient scaled alike
    for step in (3, 6, 9):
        total_pre = math.sqrt(sum(v * v for v in pre.norms[step].values()))
        assert total_pre > max_norm
        assert math.sqrt(sum(v * v for v in post.norms[step].values())) == pytest.approx(max_norm, rel=1e-4)
        new = BLOCK_PARAMS[{3: "blocks.2", 6: "blocks.1", 9: "blocks.0"}[step]][0]
        assert post.norms[step][new] == pytest.approx(pre.norms[step][new] * max_norm / total_pre, rel=1e-4)
        assert scalars[step]["clip/norm_pre"] == pytest.approx(total_pre, rel=1e-5)


def _resume_run(root, max_epochs, ckpt_path=None, save_every=None):
    seen = _Trainable()
    cbs = [GradualUnfreeze(unfreeze_epoch=1, lr_factor=0.5), WeightDrift(), seen]
    if save_every:
        cbs.append(ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=save_every, save_top_k=-1,
                                   filename="{step}"))
    task = _task("gradual")
    trainer = _trainer(root, cbs, max_epochs, **({"enable_checkpointing": True} if save_every else {}))
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return trainer, task, seen


def test_resume_in_the_middle_of_a_gradual_unfreeze(tmp_path):
    """A checkpoint at step 4 (inside epoch 1, blocks.2 just unfrozen, blocks.1 and blocks.0 still frozen), resumed:
    the same blocks frozen and unfrozen at every later step, the same named groups and LRs, and no second
    `unfreeze` entry, as in the uninterrupted run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, full_task, full_seen = _resume_run(tmp_path / "a", 4, save_every=4)
    ckpt = tmp_path / "a" / "ckpt" / "step=4.ckpt"
    assert ckpt.is_file()
    resumed, task, seen = _resume_run(tmp_path / "b", 4, ckpt_path=str(ckpt))
    assert min(seen.by_step) == 4
    for step in range(4, 4 * BATCHES):
        assert seen.by_step[step] == full_seen.by_step[step], step
        assert seen.groups[step] == full_seen.groups[step], step

    def groups(trainer, task):
        names = {id(p): n for n, p in task.named_parameters()}
        return [(g.get("name"), g["lr"], [names[id(p)] for p in g["params"]])
                for g in trainer.optimizers[0].param_groups]

    assert groups(resumed, task) == groups(full, full_task)
    assert [n for n, p in task.named_parameters() if not p.requires_grad] == []
    events = _entries(tmp_path / "b", ENTRY_UNFREEZE)
    assert [(e["step"], e["data"]["blocks"]) for e in events] == [(6, ["blocks.1"]), (9, ["blocks.0"])]
    # the drift is measured from the weights the first run started from, not from the checkpoint's
    wd = next(cb for cb in resumed.callbacks if isinstance(cb, WeightDrift))
    start = _task("gradual").model
    ref = dict(zip([n for n, _ in start.named_parameters()], wd.drift.reference))
    assert all(torch.equal(ref[n], p) for n, p in start.named_parameters())
