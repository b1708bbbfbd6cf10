"""The `transfer` recipe: digits subsets with few labels, the recipe's config, and (slow) the one-command run that
pretrains on the source task once, reuses the weights, fine-tunes, and scores the source task afterwards."""

from pathlib import Path

import pytest
import torch

from bpkit.data import DigitsDataModule
from bpkit.errors import BpkitConfigError
from bpkit.finetune import read_state_dict
from bpkit.record import RECORD_NAME, read_record
from tests._hydra import compose_train
from tests._train_app import FAST, train_app


def test_digits_subset_with_few_labels():
    dm = DigitsDataModule(classes=[5, 6, 7, 8, 9], labels_per_class=20)
    full = DigitsDataModule()
    train, val, test = (dm.split(s).tensors[1] for s in ("train", "val", "test"))
    assert torch.bincount(train, minlength=10).tolist() == [0] * 5 + [20] * 5
    for name, part in (("val", val), ("test", test)):  # every image of those classes, in the same fixed split
        ys = full.split(name).tensors[1]
        assert torch.equal(part, ys[ys >= 5])
    # the first 20 of each class in the fixed order
    ys = full.split("train").tensors[1]
    xs = full.split("train").tensors[0]
    for c in range(5, 10):
        assert torch.equal(dm.split("train").tensors[0][train == c], xs[ys == c][:20])
    assert dm.model_shapes()["out_features"] == 10
    assert [len(DigitsDataModule().split(s)) for s in ("train", "val", "test")] == [1257, 270, 270]


@pytest.mark.parametrize("kwargs, key", [({"classes": [3, 3]}, "classes"), ({"classes": [10]}, "classes"),
                                         ({"classes": "5"}, "classes"), ({"labels_per_class": 0}, "labels_per_class")])
def test_digits_bad_subsets(kwargs, key):
    with pytest.raises(BpkitConfigError) as err:
        DigitsDataModule(**kwargs)
    assert err.value.key == key


def test_recipe_config(tmp_path):
    cfg = compose_train(["recipe=transfer"], str(tmp_path))
    assert list(cfg.data.classes) == [5, 6, 7, 8, 9] and cfg.data.labels_per_class == 20
    assert list(cfg.pretrain.data.classes) == [0, 1, 2, 3, 4]
    assert cfg.finetune.mode == "gradual" and cfg.pretrained is None and cfg.monitor == "test/acc"
    root = Path(__file__).resolve().parents[1]
    recipe = (root / "recipes" / "transfer.yaml").read_bytes()
    assert recipe == (root / "conf" / "recipe" / "transfer.yaml").read_bytes()


TINY = ["recipe=transfer", "model.width=16", "trainer.max_epochs=2", "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=null", "finetune.unfreeze_epoch=1", "finetune.every_n_epochs=1",
        "pretrain.max_epochs=1", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_one_command_pretrains_once_and_fine_tunes(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [*FAST, *TINY, f"pretrain.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run1'}"]
    res = train_app(args, capsys)
    assert res.rc == 0, res.err[-3000:]
    weights = list(cache.glob("source-*.pt"))
    assert len(weights) == 1 and "pretrained on the source task (1 epochs" in res.out
    assert "loaded 4/6 tensors" in res.out and "missing (left as initialised): head.weight, head.bias" in res.out
    assert "test/acc=" in res.out and "test/source_acc=" in res.out and "source_acc_all" not in res.out
    record = read_record(tmp_path / "run1" / RECORD_NAME)
    events = [e for e in record if e["type"] == "unfreeze"]
    assert [e["data"]["blocks"] for e in events] == [["blocks.1"]]
    scalars = {k for e in record if e["type"] == "scalars" for k in e["data"]}
    assert {"drift/blocks.0", "drift/head", "lr/head", "lr/blocks.1", "test/source_acc"} <= scalars
    # forgetting, against an independent computation: the fine-tuned backbone (last.ckpt) under the source head
    from bpkit.models import MLP

    tuned = read_state_dict(tmp_path / "run1" / "checkpoints" / "last.ckpt")
    source = torch.load(weights[0], weights_only=True)
    model = MLP(64, 10, depth=3, width=16)
    model.load_state_dict({**{k[len("model."):]: v for k, v in tuned.items() if k.startswith("model.")},
                           **{k: v for k, v in source.items() if k.startswith("head.")}})
    x, y = DigitsDataModule(classes=[0, 1, 2, 3, 4]).split("test").tensors
    with torch.no_grad():
        expected = float((model(x)[:, :5].argmax(-1) == y).double().mean())
    logged = [e["data"]["test/source_acc"] for e in record if e["type"] == "scalars" and "test/source_acc" in e["data"]]
    assert logged == [pytest.approx(expected, abs=1e-9)]
    mtime = weights[0].stat().st_mtime
    res = train_app([*FAST, *TINY, f"pretrain.cache_dir={cache}", "finetune=scratch",
                     f"hydra.run.dir={tmp_path / 'run2'}"], capsys)
    assert res.rc == 0 and "bpkit-train: pretrained" not in res.out and "source_acc" not in res.out
    res = train_app([*FAST, *TINY, f"pretrain.cache_dir={cache}", "finetune=freeze",
                     f"hydra.run.dir={tmp_path / 'run3'}"], capsys)
    assert res.rc == 0 and "reused" in res.out and weights[0].stat().st_mtime == mtime


@pytest.mark.slow
def test_sweep_shares_one_pretrained_file(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    res = train_app(["-m", *FAST, *TINY, "finetune=llrd,backbone", f"hydra.sweep.dir={sweep}"], capsys)
    assert res.rc == 0, res.err[-3000:]
    assert len(list((sweep / "pretrained").glob("source-*.pt"))) == 1
    assert res.out.count("pretrained on the source task") == 1 and res.out.count("reused") == 1
