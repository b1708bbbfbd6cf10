"""The detectors' batched updates (used by the probe's replay of a log interval's rows) leave exactly the state and
raise exactly the alerts of feeding the same rows one step at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bpkit.detect import ExplodingDetector, NonFiniteDetector, SpikeDetector


def _chunks(n: int, rng: np.random.Generator) -> list[slice]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 12), replace=False))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _same_state(a, b) -> None:
    """Equal states; the running averages (``ema``, summed in another order in bulk) and what comes of them to
    1e-12."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key in ("ema", "growth"):  # growth: the norms over the average when the rule fires
            assert torch.allclose(sa[key], sb[key], rtol=1e-12, atol=0.0), key
            continue
        assert torch.equal(sa[key], sb[key]) or (sa[key].isnan() == sb[key].isnan()).all() and torch.equal(
            sa[key].nan_to_num(), sb[key].nan_to_num()), key


def _totals(seed: int, n: int = 400, width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.3, size=(n, width))) * np.linspace(1.0, 30.0, n)[:, None]  # slow growth
    norms[rng.integers(0, n, 4)] *= 1e5  # spikes that explode for a step
    start = int(rng.integers(150, 300))
    norms[start:start + 6] *= 10.0 ** np.arange(1, 7)[:, None]  # a real explosion
    norms[rng.integers(0, n, 3), rng.integers(0, width, 3)] = np.nan
    norms[int(rng.integers(0, n))] = np.inf
    return np.sqrt((norms ** 2).sum(axis=1)), norms


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", [{}, {"warmup": 5, "window": 7, "patience": 1},
                                     {"max_norm": 500.0, "baseline_steps": 3}])
def test_exploding_update_many_equals_one_by_one(seed, options):
    totals, norms = _totals(seed)
    steps = list(range(100, 100 + totals.size))
    one, many = ExplodingDetector(**options), ExplodingDetector(**options)
    flags_one, flags_many, alerts_one, alerts_many = [], [], [], []
    for part in _chunks(totals.size, np.random.default_rng(seed + 10)):
        for t, row, s in zip(totals[part], norms[part], steps[part]):
            last = one.update(t, row, s)
        flags_one.append(last)
        flags_many.append(many.update_many(totals[part], norms[part], steps[part]))
        alerts_one += one.alerts(["a", "b", "c", "d"])
        alerts_many += many.alerts(["a", "b", "c", "d"])
        _same_state(one, many)
    assert flags_one == flags_many
    assert alerts_one == alerts_many and alerts_one  # the planted explosion is found either way


@pytest.mark.parametrize("seed", range(4))
def test_spike_and_nonfinite_update_many_equal_one_by_one(seed):
    rng = np.random.default_rng(seed)
    n = 300
    values = np.exp(rng.normal(0.0, 0.2, size=(n, 2)))
    values[rng.integers(20, n, 3), 0] *= 1e3  # loss spikes
    values[rng.integers(0, n, 3), 1] = np.nan
    values[rng.integers(0, n, 2), 0] = 0.0
    masks = rng.random((n, 5)) < 0.01
    steps = list(range(n))
    spike_one, spike_many = SpikeDetector(("loss", "grad_norm_total")), SpikeDetector(("loss", "grad_norm_total"))
    nf_one, nf_many = NonFiniteDetector(), NonFiniteDetector()
    names = list("vwxyz")
    for part in _chunks(n, rng):
        for v, m, s in zip(values[part], masks[part], steps[part]):
            last_spike, last_nf = spike_one.update(v, s), nf_one.update(m, s)
        assert spike_many.update_many(values[part], steps[part]).tolist() == last_spike.tolist()
        assert nf_many.update_many(masks[part], steps[part]) == last_nf
        _same_state(spike_one, spike_many)
        _same_state(nf_one, nf_many)
        assert spike_one.alerts() == spike_many.alerts()
        assert nf_one.alerts(names) == nf_many.alerts(names)


def test_exploding_update_many_takes_the_bulk_path_on_calm_batches(monkeypatch):
    calls = []
    original = ExplodingDetector._update_each
    monkeypatch.setattr(ExplodingDetector, "_update_each", lambda self, *a: calls.append(1) or original(self, *a))
    rng = np.random.default_rng(0)
    det = ExplodingDetector()
    norms = np.exp(rng.normal(0.0, 0.3, size=(500, 3)))
    totals = np.sqrt((norms ** 2).sum(axis=1))
    for start in range(0, 500, 50):
        assert det.update_many(totals[start:start + 50], norms[start:start + 50], range(start, start + 50)) is False
    assert len(calls) == 1  # only the first batch (the growth rule's baseline is not known yet) goes step by step
    assert det.seen == 500 and det.alerts(["a", "b", "c"]) == []
