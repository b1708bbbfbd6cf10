"""The finetune options (conf/finetune/): blocks per model family, requires_grad and the named parameter groups
(names and learning rates) each option gives, bad configs, and the drift statistic against a float64 reference."""

import math

import pytest
import torch

from bpkit.errors import BpkitConfigError
from bpkit.finetune import FinetuneSpec, gradual_schedule, model_blocks, param_groups
from bpkit.models import MLP, RNN, ResNet
from bpkit.stats.drift import BlockDrift
from tests._hydra import compose_train, options

FAST = ["torch_threads=1", "logger=none", "report=false", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "callbacks=none", "model.depth=4", "model.width=16"]


def test_the_group_has_every_option():
    assert options("finetune") == sorted(["none", "scratch", "freeze", "backbone", "gradual", "llrd"])


def test_blocks_per_model_family():
    mlp = MLP(64, 10, depth=4, width=8)
    assert model_blocks(mlp).names == ["blocks.0", "blocks.1", "blocks.2", "head"]
    res = ResNet(1, 10, depth=2, width=4)
    assert model_blocks(res).names == ["stem", "blocks.0", "blocks.1", "head"]
    rnn = RNN("lstm", input_size=3, hidden_size=5, num_layers=2, out_features=2, vocab_size=7)
    blocks = model_blocks(rnn)
    assert blocks.names == ["embed", "rnn.l0", "rnn.l1", "head"]
    assert [n for n, _ in dict(blocks.blocks)["rnn.l1"]] == ["rnn.weight_ih_l1", "rnn.weight_hh_l1",
                                                             "rnn.bias_ih_l1", "rnn.bias_hh_l1"]
    for model in (mlp, res, rnn):  # every parameter in exactly one block
        ids = [id(p) for p in model_blocks(model).params()]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_a_model_without_a_head_is_refused():
    with pytest.raises(BpkitConfigError, match="a model with a backbone and a head"):
        model_blocks(torch.nn.Linear(3, 2))


@pytest.mark.parametrize("mode, trainable, groups", [
    ("none", ["blocks.0", "blocks.1", "blocks.2", "head"], [("all", 0.1)]),
    ("scratch", ["blocks.0", "blocks.1", "blocks.2", "head"], [("all", 0.1)]),
    ("freeze", ["head"], [("head", 0.1)]),
    ("backbone", ["head"], [("head", 0.1)]),
    ("gradual", ["head"], [("head", 0.1)]),
    ("llrd", ["blocks.0", "blocks.1", "blocks.2", "head"],
     [("blocks.0", 0.1 * 0.5 ** 3), ("blocks.1", 0.1 * 0.25), ("blocks.2", 0.05), ("head", 0.1)]),
])
def test_each_option_sets_requires_grad_and_named_groups(mode, trainable, groups):
    model = MLP(64, 10, depth=4, width=8)
    got = param_groups(model, FinetuneSpec(mode=mode), lr=0.1)
    assert [(g["name"], pytest.approx(g["lr"])) for g in got] == groups
    blocks = model_blocks(model)
    assert [b for b in blocks.names if all(p.requires_grad for p in blocks.params([b]))] == trainable
    assert [b for b in blocks.names if not any(p.requires_grad for p in blocks.params([b]))] == \
        [b for b in blocks.names if b not in trainable]
    in_groups = [id(p) for g in got for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_gradual_and_backbone_schedules():
    blocks = model_blocks(MLP(64, 10, depth=4, width=8))
    assert gradual_schedule(blocks, FinetuneSpec(mode="gradual", unfreeze_epoch=2, every_n_epochs=3)) == \
        {2: ["blocks.2"], 5: ["blocks.1"], 8: ["blocks.0"]}
    assert gradual_schedule(blocks, FinetuneSpec(mode="backbone", unfreeze_epoch=3)) == \
        {3: ["blocks.0", "blocks.1", "blocks.2"]}


@pytest.mark.parametrize("mode", ["none", "freeze", "llrd", "backbone", "gradual"])
def test_bpkit_train_builds_the_groups(mode, tmp_path):
    """Real Hydra compose + build + a real fit of a few steps: the optimizer Lightning steps has the groups."""
    from bpkit.train import build

    cfg = compose_train([*FAST, f"finetune={mode}", "optimizer=sgd", "optimizer.lr=0.2", "trainer.max_epochs=3",
                         "trainer.max_steps=2"], str(tmp_path))  # stops in epoch 0, before any unfreezing
    parts = build(cfg)
    parts["trainer"].fit(parts["task"], datamodule=parts["datamodule"])
    opt = parts["trainer"].optimizers[0]
    names = [g.get("name") for g in opt.param_groups]
    expected = {"none": [None], "freeze": ["head"], "backbone": ["head"], "gradual": ["head"],
                "llrd": ["blocks.0", "blocks.1", "blocks.2", "head"]}[mode]
    assert names == expected
    if mode == "llrd":
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 0.5 ** k for k in (3, 2, 1, 0)])
    model = parts["task"].model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert bool(frozen) == (mode in ("freeze", "backbone", "gradual"))
    assert all(not n.startswith("head") for n in frozen)


@pytest.mark.parametrize("overrides, message", [
    (["finetune.mode=sideways"], "finetune.mode='sideways' is invalid: expected one of none, scratch, freeze, "
                                 "backbone, gradual, llrd"),
    (["finetune=gradual", "finetune.unfreeze_epoch=5", "trainer.max_epochs=3"],
     "finetune.unfreeze_epoch=5 is invalid: expected an epoch below trainer.max_epochs=3 (0 .. 2)"),
    (["finetune=backbone", "finetune.unfreeze_epoch=3", "trainer.max_epochs=3"],
     "finetune.unfreeze_epoch=3 is invalid: expected an epoch below trainer.max_epochs=3"),
    (["finetune=llrd", "finetune.llrd_factor=0"], "finetune.llrd_factor=0 is invalid: expected a number > 0.0 and "
                                                  "<= 1.0"),
    (["finetune=llrd", "finetune.llrd_factor=1.5"], "finetune.llrd_factor=1.5 is invalid"),
    (["finetune=llrd", "finetune.llrd_factor=-0.5"], "finetune.llrd_factor=-0.5 is invalid"),
    (["finetune=gradual", "finetune.every_n_epochs=0"], "finetune.every_n_epochs=0 is invalid: expected an "
                                                        "integer >= 1"),
    (["+finetune.speed=3"], "finetune.speed=3 is invalid: expected one of the keys"),
])
def test_bad_finetune_configs_fail_early(overrides, message, tmp_path):
    from bpkit.train import build

    cfg = compose_train([*FAST, *overrides], str(tmp_path))
    with pytest.raises(BpkitConfigError) as err:
        build(cfg)
    assert message in str(err.value)


def test_drift_matches_a_float64_reference():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(3), torch.randn(2, 5), torch.randn(2)]
    blocks = ["a", "a", "b", "b"]
    drift = BlockDrift(params, blocks)
    ref = [p.double().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    got = drift.compute(params)

    def rel(idx):
        num = math.sqrt(sum(float(((params[i].double() - ref[i]) ** 2).sum()) for i in idx))
        den = math.sqrt(sum(float((ref[i] ** 2).sum()) for i in idx))
        return num / den

    assert got.tolist() == pytest.approx([rel([0, 1]), rel([2, 3])], rel=1e-5)
    assert drift.names == ["a", "b"]
