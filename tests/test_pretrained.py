"""`pretrained=<path>`: Lightning checkpoints and state_dict files, strict and partial loading, shape mismatches,
files that need pickled code, and bad paths (one line, exit status 2, no traceback, no run directory)."""

import functools
import os

import lightning.pytorch as pl
import pytest
import torch

from bpkit.data import DigitsDataModule
from bpkit.errors import BpkitConfigError
from bpkit.finetune import load_pretrained, read_state_dict
from bpkit.models import MLP, RNN
from bpkit.task import BackpropTask
from tests._train_app import FAST, train_app


def _mlp(out=10, width=16, depth=3, seed=0):
    torch.manual_seed(seed)
    return MLP(64, out, depth=depth, width=width)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_plain_state_dict_loads_exactly(tmp_path):
    src = _mlp(seed=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = _mlp(seed=2)
    report = load_pretrained(dst, tmp_path / "w.pt", strict=True)
    assert _same(src, dst)
    assert (report.missing, report.unexpected, report.mismatched, report.prefix) == ([], [], {}, "")
    assert len(report.loaded) == 6


def test_a_lightning_checkpoint_loads_with_its_prefix(tmp_path):
    """A real checkpoint written by Trainer.save_checkpoint (with optimizer and loop state): read with
    weights_only=True, the LightningModule's `model.` prefix removed."""
    task = BackpropTask(_mlp(seed=3), "cross_entropy", functools.partial(torch.optim.Adam, lr=1e-3), num_classes=10)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    dst = _mlp(seed=4)
    report = load_pretrained(dst, tmp_path / "run.ckpt", strict=True)
    assert report.prefix == "model."
    assert _same(task.model, dst)


def test_partial_load_skips_shape_mismatches_and_reports_every_kind(tmp_path):
    src = _mlp(out=5, seed=1)  # another head size
    state = src.state_dict()
    state["extra.weight"] = torch.ones(2)
    del state["blocks.0.linear.bias"]
    torch.save(state, tmp_path / "w.pt")
    dst = _mlp(out=10, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_pretrained(dst, tmp_path / "w.pt")
    after = dst.state_dict()
    assert report.loaded == ["blocks.0.linear.weight", "blocks.1.linear.weight", "blocks.1.linear.bias"]
    assert report.missing == ["blocks.0.linear.bias", "head.weight", "head.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == {"head.weight": ([5, 16], [10, 16]), "head.bias": ([5], [10])}
    for k in report.loaded:
        assert torch.equal(after[k], state[k])
    for k in report.missing:  # skipped tensors keep their initial values
        assert torch.equal(after[k], before[k])
    line = report.summary()
    assert "loaded 3/6 tensors" in line and "missing" in line and "unexpected (ignored): extra.weight" in line
    assert "shape-mismatched (skipped): head.weight [5, 16] in the file vs [10, 16]" in line
    with pytest.raises(BpkitConfigError, match=r"pretrained_strict=true"):
        load_pretrained(_mlp(), tmp_path / "w.pt", strict=True)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(RNN("lstm", input_size=8, hidden_size=4, out_features=10).state_dict(), tmp_path / "rnn.pt")
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BpkitConfigError,
                       match=r"weights of this model \(MLP\): none of the file's 3 weight tensors "
                             r"\(2-D and more\) fits"):
        load_pretrained(model, tmp_path / "rnn.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    torch.save(functools.partial(print, "code"), tmp_path / "code.pt")  # loading it would need pickled code
    cases = {
        str(tmp_path / "nope.ckpt"): "does not exist",
        str(tmp_path): "is not a file",
        str(tmp_path / "notes.txt"): "was not written by torch.save",
        str(tmp_path / "meta.pt"): "not names -> tensors",
        str(tmp_path / "code.pt"): "needs pickled Python objects",
    }
    for path, what in cases.items():
        with pytest.raises(BpkitConfigError) as err:
            read_state_dict(path)
        assert err.value.key == "pretrained" and what in str(err.value), str(err.value)


def _runs(root):
    return sorted(p for p in root.glob("outputs/*/*") if p.is_dir())


@pytest.mark.parametrize("name, what", [("nope.ckpt", "does not exist"), ("notes.txt", "was not written by torch.save"),
                                        ("code.pt", "needs pickled Python objects"),
                                        ("rnn.pt", "none of the file's 3 weight tensors")])
def test_bpkit_train_bad_pretrained_is_one_line(name, what, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save(functools.partial(print, "code"), tmp_path / "code.pt")
    torch.save(RNN("lstm", input_size=8, hidden_size=4, out_features=10).state_dict(), tmp_path / "rnn.pt")
    res = train_app([*FAST, f"pretrained={tmp_path / name}"], capsys)
    assert res.rc == 2, res.err[-2000:]
    errors = [ln for ln in res.err.splitlines() if ln.startswith("bpkit-train: error:")]
    assert len(errors) == 1 and f"pretrained='{tmp_path / name}' is invalid" in errors[0] and what in errors[0]
    assert "Traceback" not in res.err
    assert not _runs(tmp_path), "no run directory is left behind"
    assert not os.path.exists(tmp_path / "nope.ckpt")


@pytest.mark.slow
def test_bpkit_train_loads_and_reports(tmp_path, capsys):
    src = MLP(64, 10, depth=3, width=128)  # the default model's shapes
    torch.save(src.state_dict(), tmp_path / "w.pt")
    res = train_app([*FAST, f"pretrained={tmp_path / 'w.pt'}", "trainer.limit_train_batches=1"], capsys)
    assert res.rc == 0, res.err[-2000:]
    assert f"bpkit-train: pretrained {tmp_path / 'w.pt'}: loaded 6/6 tensors" in res.out
    res = train_app([*FAST, f"pretrained={tmp_path / 'w.pt'}", "model.width=32"], capsys)
    assert res.rc == 2 and "none of the file's 3 weight tensors" in res.err
    res = train_app([*FAST, f"pretrained={tmp_path / 'w.pt'}", "model.depth=4", "pretrained_strict=true"], capsys)
    assert res.rc == 2 and "pretrained_strict=true" in res.err and "Traceback" not in res.err
