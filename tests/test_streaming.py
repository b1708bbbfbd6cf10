"""Streaming windows over one long sequence: consecutive rows, bounded memory, exact mid-epoch resume."""

from __future__ import annotations

import functools
import tracemalloc

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bpkit.data.streaming import StreamingTextDataModule, StreamWindows, scan_vocabulary
from bpkit.errors import BpkitConfigError
from bpkit.models import RNN
from bpkit.tbptt import TBPTTTask



def write_text(path, n_bytes, seed=0):
    rng = np.random.default_rng(seed)
    words = ["back", "prop", "agation ", "through ", "time, ", "gradients ", "vanish.\n", "é "]
    text = "".join(rng.choice(words, size=n_bytes // 4))
    path.write_bytes(text.encode("utf-8")[:n_bytes])
    return path


def test_windows_continue_each_row_and_targets_are_shifted():
    tokens = torch.arange(103)
    batches = StreamWindows(tokens, batch_size=4, window=6)
    got = list(batches)
    # 4 streams of 25 tokens; 24 steps with a next-token target -> windows 6, 6, 6, 6
    assert len(batches) == len(got) == 4
    x = torch.cat([b[0] for b in got], dim=1)
    y = torch.cat([b[1] for b in got], dim=1)
    for row in range(4):
        assert torch.equal(x[row], torch.arange(row * 25, row * 25 + 24))
        assert torch.equal(y[row], x[row] + 1)
    assert [b[0].shape for b in StreamWindows(tokens, 4, 7)] == [(4, 7), (4, 7), (4, 7), (4, 3)]


def test_features_targets_lookup_and_ranks():
    inputs = np.arange(40 * 3).reshape(40, 3)
    targets = np.arange(40) * 10
    x, y = next(iter(StreamWindows(inputs, batch_size=2, window=5, targets=targets)))
    assert x.shape == (2, 5, 3) and torch.equal(y[1], torch.arange(20, 25) * 10)
    table = np.arange(256)[::-1].copy()
    x, _ = next(iter(StreamWindows(np.arange(20, dtype=np.uint8), 1, 4, lookup=table)))
    assert x.tolist() == [[255, 254, 253, 252]]
    seen = [next(iter(StreamWindows(torch.arange(80), 2, 4, rank=r, world_size=2)))[0][:, 0].tolist() for r in (0, 1)]
    assert seen == [[0, 20], [40, 60]]  # each rank reads its own streams


def test_text_module_decodes_back_to_the_file(tmp_path):
    path = write_text(tmp_path / "t.txt", 5000)
    raw = path.read_bytes()
    dm = StreamingTextDataModule(str(path), batch_size=3, window=40, val_fraction=0.2)
    assert dm.vocab_size == len(set(raw))
    x, y = next(iter(dm.train_dataloader()))
    stream = dm.cut // 3
    assert dm.decode(x[1]).encode() == raw[stream:stream + 40] or "\ufffd" in dm.decode(x[1])
    assert bytes(dm.symbols[x[2].numpy()].astype(np.uint8)) == raw[2 * stream:2 * stream + 40]
    assert torch.equal(x[:, 1:], y[:, :-1])
    vx, _ = next(iter(dm.val_dataloader()))
    assert bytes(dm.symbols[vx[0].numpy()].astype(np.uint8)) == raw[dm.cut:dm.cut + 40]
    assert StreamingTextDataModule(str(path), vocab="bytes", batch_size=3).vocab_size == 256
    assert dm.model_shapes()["vocab_size"] == dm.vocab_size


def peak_while_streaming(path):
    dm = StreamingTextDataModule(str(path), batch_size=8, window=64)
    tracemalloc.start()
    n = sum(1 for _ in dm.train_dataloader())
    scan_vocabulary(dm.data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return n, peak


def test_memory_bounded_by_the_window_not_the_text(tmp_path):
    small = peak_while_streaming(write_text(tmp_path / "small.txt", 60_000))
    large = peak_while_streaming(write_text(tmp_path / "large.txt", 900_000, seed=1))
    assert large[0] > 12 * small[0]  # 15x more windows ...
    assert large[1] < 1.5 * small[1] + 64_000  # ... about the same peak of Python/numpy allocations
    assert large[1] < 900_000


def test_state_dict_resumes_at_the_next_window():
    batches = StreamWindows(torch.arange(100), batch_size=2, window=7)
    it = iter(batches)
    next(it), next(it)
    assert batches.state_dict() == {"window": 2}
    again = StreamWindows(torch.arange(100), batch_size=2, window=7)
    again.load_state_dict({"window": 2})
    first = next(iter(again))[0]
    assert torch.equal(first[0], torch.arange(14, 21))
    assert len(list(again)) == len(again)  # the next epoch starts from the beginning
    done = StreamWindows(torch.arange(100), batch_size=2, window=7)
    done.load_state_dict({"window": len(done)})  # an end-of-epoch checkpoint: start a full epoch
    assert len(list(done)) == len(done)
    counted = StreamWindows(torch.arange(100), batch_size=2, window=7, progress=lambda: 5)
    assert counted.state_dict() == {"window": 5}


def make_task(vocab):
    torch.manual_seed(0)
    model = RNN("lstm", input_size=8, hidden_size=16, out_features=vocab, output="all", vocab_size=vocab)
    return TBPTTTask(model, "cross_entropy", functools.partial(torch.optim.Adam, lr=1e-2), metrics=(),
                     num_classes=vocab, truncated_bptt_steps=10, carry_hiddens=True)


def fit(path, **kwargs):
    dm = StreamingTextDataModule(str(path), batch_size=4, window=20)
    task = make_task(dm.vocab_size)
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, **kwargs)
    trainer.fit(task, dm, ckpt_path=ckpt_path)
    return trainer, task


def test_resume_mid_epoch_continues_exactly(tmp_path):
    path = write_text(tmp_path / "t.txt", 2000)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    full_trainer, full = fit(path, callbacks=[ckpt])
    steps = full_trainer.global_step
    assert steps == 2 * 22 + 1  # 4 streams of 450 bytes: 22 windows of 20 (2 chunks) + 1 of 9 steps
    mid = tmp_path / "ck" / "epoch=0-step=12.ckpt"
    assert mid.exists()
    resumed_trainer, resumed = fit(path, ckpt_path=str(mid), enable_checkpointing=False)
    assert resumed_trainer.global_step == steps
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input(tmp_path):
    with pytest.raises(BpkitConfigError, match="text_file='nope.txt' is invalid: expected an existing"):
        StreamingTextDataModule("nope.txt")
    with pytest.raises(BpkitConfigError, match="window=0 is invalid: expected an integer >= 1"):
        StreamingTextDataModule(window=0)
    with pytest.raises(BpkitConfigError, match="vocab='words' is invalid: expected one of text, bytes"):
        StreamingTextDataModule(vocab="words")
    short = write_text(tmp_path / "short.txt", 30)
    with pytest.raises(BpkitConfigError, match="expected a text of at least"):
        StreamingTextDataModule(str(short), batch_size=8)
    with pytest.raises(BpkitConfigError, match=r"inputs='a sequence of 3 steps' is invalid"):
        StreamWindows(torch.arange(3), batch_size=2, window=4)
    with pytest.raises(BpkitConfigError, match="rank=2 is invalid"):
        StreamWindows(torch.arange(30), batch_size=2, window=4, rank=2, world_size=2)
