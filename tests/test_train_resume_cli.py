"""`bpkit-train ckpt_path=...`: resuming a run through the app, as a user types it (in-process Hydra runs).

A run of N steps, then resumed runs: each continues the step count (checkpoint global_step, Adam's own step
count and the steps in the run record all continue from the checkpoint), `ckpt_path=last` picks the newest
previous run of the default `outputs/<date>/<time>` layout, or the run's own directory when `hydra.run.dir` is
pinned; bad values fail before anything runs with one line naming the key and the value."""

import json

import pytest
import torch

from tests._train_app import FAST, next_second, train_app

N = 4  # steps of the first run: trainer.max_epochs=1 x trainer.limit_train_batches=4


def _runs(root):
    return sorted(p for p in root.glob("outputs/*/*") if p.is_dir())


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")


def _train_steps(run_dir):
    """Steps of the record's training scalars (one per step with trainer.log_every_n_steps=1)."""
    steps, start = [], None
    for line in open(run_dir / "bpkit_record.jsonl"):
        e = json.loads(line)
        if e["type"] == "scalars" and any(k.startswith("train/") for k in e["data"]):
            steps.append(e["step"])
        if e["type"] == "run" and e["data"].get("event") == "start":
            start = e["data"]
    return steps, start


def _adam_steps(ckpt):
    return {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def test_resume_from_a_path_and_from_last_continues_the_run(tmp_path, capsys):
    first = train_app(FAST, capsys)
    assert first.rc == 0, first.err[-3000:]
    (run_a,) = _runs(tmp_path)
    ckpt_a = _ckpt(run_a)
    assert ckpt_a["global_step"] == N and _adam_steps(ckpt_a) == {N}
    steps_a, _ = _train_steps(run_a)
    assert len(steps_a) == N

    # 1. an explicit path; the limits are totals: max_epochs=2 trains N more steps
    next_second()
    resumed = train_app([*FAST, "trainer.max_epochs=2", f"ckpt_path={run_a}/checkpoints/last.ckpt"], capsys)
    assert resumed.rc == 0, resumed.err[-3000:]
    assert f"bpkit-train: resuming from {run_a}/checkpoints/last.ckpt" in resumed.out
    (run_b,) = set(_runs(tmp_path)) - {run_a}
    ckpt_b = _ckpt(run_b)
    assert ckpt_b["global_step"] == 2 * N and ckpt_b["epoch"] == ckpt_a["epoch"] + 1
    assert _adam_steps(ckpt_b) == {2 * N}  # the optimizer's own count: N restored + N new
    steps_b, start_b = _train_steps(run_b)
    assert steps_b == [s + N for s in steps_a], "the resumed run logs the steps after the checkpoint, once each"
    assert start_b["resumed_at_step"] == N
    moved = [k for k, v in ckpt_b["state_dict"].items() if not torch.equal(v, ckpt_a["state_dict"][k])]
    assert moved, "the resumed run trained"

    # 2. `last`: the newest last.ckpt of the previous runs in outputs/*/* -- run_b's, not run_a's
    next_second()
    again = train_app([*FAST, "trainer.max_epochs=3", "ckpt_path=last"], capsys)
    assert again.rc == 0, again.err[-3000:]
    assert f"bpkit-train: resuming from {run_b}/checkpoints/last.ckpt" in again.out
    (run_c,) = set(_runs(tmp_path)) - {run_a, run_b}
    assert _ckpt(run_c)["global_step"] == 3 * N
    assert _train_steps(run_c)[0] == [s + 2 * N for s in steps_a]

    # 3. a checkpoint of another model: one line naming the key, no traceback
    other = train_app([*FAST, "model.depth=5", f"ckpt_path={run_c}/checkpoints/last.ckpt"], capsys)
    assert other.rc == 2
    assert f"bpkit-train: error: ckpt_path='{run_c}/checkpoints/last.ckpt' is invalid: expected a checkpoint of " \
           "this model and config (Error(s) in loading state_dict" in other.err
    assert "Traceback" not in other.err


@pytest.mark.slow
def test_last_with_a_pinned_run_dir_resumes_that_run(tmp_path, capsys):
    """`hydra.run.dir=D ckpt_path=last`: D's own last.ckpt, even when a newer run sits in outputs/."""
    run_d = tmp_path / "pinned"
    assert train_app([*FAST, f"hydra.run.dir={run_d}"], capsys).rc == 0
    next_second()
    assert train_app(FAST, capsys).rc == 0  # a newer run of the default layout
    newer = _ckpt(_runs(tmp_path)[0])
    assert newer["global_step"] == N
    pinned = train_app([*FAST, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_d}"], capsys)
    assert pinned.rc == 0, pinned.err[-3000:]
    assert f"bpkit-train: resuming from {run_d}/checkpoints/last.ckpt" in pinned.out
    assert _ckpt(run_d)["global_step"] == 2 * N
    assert _train_steps(run_d)[0][-N:] == [s + N for s in _train_steps(_runs(tmp_path)[0])[0]]


@pytest.mark.parametrize("value, message", [
    ("{tmp}/nope.ckpt", "ckpt_path='{tmp}/nope.ckpt' is invalid: expected the path of a checkpoint file (.ckpt) or "
                        "'last': {tmp}/nope.ckpt does not exist"),
    ("{tmp}", "ckpt_path='{tmp}' is invalid: expected the path of a checkpoint file (.ckpt) or 'last': {tmp} is not "
              "a file"),
    ("{tmp}/notes.txt", "ckpt_path='{tmp}/notes.txt' is invalid: expected a checkpoint written by Lightning "
                        "(torch.save): {tmp}/notes.txt is not one"),
    ("last", "ckpt_path='last' is invalid: expected a previous run's checkpoint, but there is no "
             "outputs/*/*/checkpoints/last.ckpt; train once first"),
], ids=["missing", "directory", "not-a-checkpoint", "last-without-runs"])
def test_bad_ckpt_path_fails_before_anything_runs(value, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    res = train_app([*FAST, f"ckpt_path={value.format(tmp=tmp_path)}"], capsys)
    assert res.rc == 2
    assert f"bpkit-train: error: {message.format(tmp=tmp_path)}" in res.err
    assert "Traceback" not in res.err
    assert not _runs(tmp_path), "no run directory is left behind"
