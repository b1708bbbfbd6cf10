import pytest
import torch

from bpkit.data import (AddingDataModule, CharLMDataModule, CopyDataModule, DigitsDataModule, MultilabelDataModule,
                        RegressionDataModule)
from bpkit.errors import BpkitConfigError

SMALL = dict(num_train=64, num_val=16, num_test=16)
MAKERS = {
    "digits": lambda seed: DigitsDataModule(seed=seed),
    "regression": lambda seed: RegressionDataModule(seed=seed, **SMALL),
    "multilabel": lambda seed: MultilabelDataModule(seed=seed, **SMALL),
    "adding": lambda seed: AddingDataModule(seq_len=12, seed=seed, **SMALL),
    "copy": lambda seed: CopyDataModule(delay=5, n_symbols=8, seed=seed, **SMALL),
    "charlm": lambda seed: CharLMDataModule(seq_len=16, seed=seed),
}


def _all(dm, name):
    ds = dm.split(name)
    return ds.tensors


@pytest.mark.parametrize("name", list(MAKERS))
def test_deterministic_for_a_seed(name):
    a, b = MAKERS[name](3), MAKERS[name](3)
    for split in ("train", "val", "test"):
        for ta, tb in zip(_all(a, split), _all(b, split)):
            assert torch.equal(ta, tb)
    xa = next(iter(a.train_dataloader()))[0]
    xb = next(iter(b.train_dataloader()))[0]
    assert torch.equal(xa, xb)  # the shuffled order too


@pytest.mark.parametrize("name", ["regression", "multilabel", "adding", "copy"])
def test_synthetic_depends_on_seed(name):
    assert not torch.equal(_all(MAKERS[name](1), "train")[0], _all(MAKERS[name](2), "train")[0])


@pytest.mark.parametrize("name", list(MAKERS))
def test_splits_disjoint(name):
    dm = MAKERS[name](0)
    rows = {s: {tuple(r.flatten().tolist()) for r in _all(dm, s)[0]} for s in ("train", "val", "test")}
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


def test_digits_split_shapes_and_layouts():
    dm = DigitsDataModule()
    assert [len(dm.split(s)) for s in ("train", "val", "test")] == [1257, 270, 270]
    x, y = dm.split("train").tensors
    assert x.shape == (1257, 64) and 0.0 <= x.min() and x.max() <= 1.0
    assert set(y.tolist()) == set(range(10))
    # the split does not depend on the run's seed
    assert torch.equal(DigitsDataModule(seed=7).split("test").tensors[1], dm.split("test").tensors[1])
    dm.use_layout("image")
    assert dm.split("train").tensors[0].shape == (1257, 1, 8, 8)
    dm.use_layout("sequence")
    assert dm.split("val").tensors[0].shape == (270, 8, 8)


def test_adding_targets_are_sums_of_marked_values():
    dm = AddingDataModule(seq_len=20, **SMALL)
    x, y = dm.split("train").tensors
    assert x.shape == (64, 20, 2) and y.shape == (64, 1)
    assert torch.all(x[:, :10, 1].sum(1) == 1) and torch.all(x[:, 10:, 1].sum(1) == 1)
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1, keepdim=True), y)


def test_copy_task_layout():
    dm = CopyDataModule(delay=4, n_symbols=3, alphabet=5, **SMALL)
    x, y = dm.split("train").tensors
    assert x.shape == (64, 10, 7) and y.shape == (64, 10)
    tokens = x.argmax(-1)
    assert torch.equal(y[:, -3:], tokens[:, :3])  # outputs are the first symbols
    assert torch.all(tokens[:, 3 + 4 - 1] == 6)  # the go marker
    assert torch.all(y[:, :-3] == 5)  # blank elsewhere


def test_charlm_windows_and_vocab(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcab" * 100, encoding="utf-8")
    dm = CharLMDataModule(str(text), seq_len=10)
    assert dm.vocab == ["a", "b", "c"]
    x, y = dm.split("train").tensors
    assert x.shape[1] == 10 and torch.equal(x[:, 1:], y[:, :-1])
    assert dm.model_shapes()["vocab_size"] == 3


def test_bad_data_arguments(tmp_path):
    with pytest.raises(BpkitConfigError, match="text_file='.*missing.txt'.*existing"):
        CharLMDataModule(str(tmp_path / "missing.txt"))
    with pytest.raises(BpkitConfigError, match="batch_size=0"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(BpkitConfigError, match="layout='image'"):
        AddingDataModule(layout="image")
    with pytest.raises(BpkitConfigError, match="seq_len=1"):
        AddingDataModule(seq_len=1)
