"""Each detection rule on constructed cases, checked against hand-written references."""

import math
import statistics

import numpy as np
import pytest
import torch

from bpkit import Alert, BpkitConfigError
from bpkit.detect import ExplodingDetector, NonFiniteDetector, SpikeDetector, VanishingDetector

NAMES = ["l0.weight", "l1.weight", "l2.weight", "head.weight"]


def _read(det, names=NAMES):
    return det.alerts(names)


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------- vanishing

def test_vanishing_needs_patience_consecutive_checks_and_both_ratios():
    det = VanishingDetector(rel_max=1e-3, rel_weight=1e-5, patience=3)
    w = _t([1.0, 1.0, 1.0, 1.0])
    g = _t([1e-9, 1e-2, 1e-9, 1.0])  # l2: tiny vs the max, but its own weights are tiny too
    w2 = w.clone()
    w2[2] = 1e-6
    for step in range(2):
        det.update(g, w2, _t(step, torch.int64))
    assert _read(det) == []  # 2 < patience
    det.update(_t([1.0, 1.0, 1.0, 1.0]), w2, _t(2, torch.int64))  # the run is broken
    for step in range(3, 6):
        det.update(g, w2, _t(step, torch.int64))
    alerts = _read(det)
    assert [(a.kind, a.where, a.step) for a in alerts] == [("vanishing", "l0.weight", 5)]
    assert alerts[0].value == pytest.approx(1e-9) and alerts[0].threshold == 1e-3
    assert "head.weight" in alerts[0].message and "-9.0" in alerts[0].message  # names the max and the profile


def test_vanishing_alerts_once_per_episode_and_again_after_recovery():
    det = VanishingDetector(patience=1)
    w = torch.ones(4)
    low, ok = _t([1e-9, 1.0, 1.0, 1.0]), torch.ones(4)
    det.update(low, w, _t(0, torch.int64))
    assert len(_read(det)) == 1
    det.update(low, w, _t(1, torch.int64))
    assert _read(det) == []  # still the same episode
    det.update(ok, w, _t(2, torch.int64))
    det.update(low, w, _t(3, torch.int64))
    assert [a.step for a in _read(det)] == [3]


def test_vanishing_ignores_masked_and_nonfinite_tensors():
    det = VanishingDetector(patience=1)
    det.update(_t([1e-9, float("nan"), 1e-9, 1.0]), torch.ones(4), _t(0, torch.int64),
               mask=torch.tensor([False, True, True, True]))
    assert [a.where for a in _read(det)] == ["l2.weight"]


# ----------------------------------------------------------------- exploding

def test_exploding_threshold_is_factor_times_the_running_median():
    det = ExplodingDetector(factor=5.0, window=8, warmup=4, patience=1)
    values = [1.0, 2.0, 1.5, 3.0, 2.5, 1.0, 2.0, 2.2, 1.8, 14.0]
    for step, v in enumerate(values):
        det.update(_t(v), _t([v, 1.0]), _t(step, torch.int64))
    (alert,) = det.alerts(["w", "b"])
    history = values[-9:-1][-8:]
    assert alert.step == 9 and alert.value == 14.0
    assert alert.threshold == pytest.approx(5.0 * statistics.median_low(history))
    assert alert.where == "w"  # it grew; "b" did not


def test_exploding_absolute_bound_and_warmup():
    det = ExplodingDetector(max_norm=10.0, warmup=50)
    det.update(_t(3.0), _t([3.0]), _t(0, torch.int64))
    assert det.alerts(["w"]) == []
    det.update(_t(11.0), _t([11.0]), _t(1, torch.int64))  # during warm-up only the bound applies
    (alert,) = det.alerts(["w"])
    assert alert.threshold == 10.0 and alert.step == 1


def test_exploding_needs_patience_consecutive_steps():
    det = ExplodingDetector(factor=5.0, window=8, warmup=4, patience=3)
    values = [1.0] * 6 + [20.0] + [1.0] * 3 + [20.0, 30.0]  # a lone jump, then two in a row: not yet
    for step, v in enumerate(values):
        det.update(_t(v), _t([v]), _t(step, torch.int64))
    assert det.alerts(["w"]) == []
    det.update(_t(40.0), _t([40.0]), _t(len(values), torch.int64))  # the third step in a row
    (alert,) = det.alerts(["w"])
    assert alert.step == len(values) and alert.value == 40.0


def test_exploding_names_the_fastest_growing_tensors():
    det = ExplodingDetector(factor=10.0, warmup=3, patience=1)
    for step in range(10):
        det.update(_t(1.0), _t([0.5, 0.5, 0.5, 0.5]), _t(step, torch.int64))
    det.update(_t(100.0), _t([0.5, 80.0, 0.5, 40.0]), _t(10, torch.int64))
    (alert,) = _read(det)
    assert alert.where == "l1.weight, head.weight"
    assert "x160" in alert.message


def test_exploding_skips_nonfinite_totals():
    det = ExplodingDetector(warmup=2)
    for step, v in enumerate([1.0, 1.0, float("nan"), float("inf"), 1.0]):
        flag = det.update(_t(v), _t([v]), _t(step, torch.int64))
        assert flag is False
    assert det.alerts(["w"]) == []
    assert np.isnan(det.history).sum() == det.window - 3


def test_exploding_defaults_tolerate_a_deep_relu_net_waking_up_but_not_an_exponential_blowup():
    """The calibrated defaults (benchmarks/results/calibration.md): a norm that grows ~60x over a few dozen steps and
    settles (a deep ReLU MLP starting to learn) is healthy; one that grows ~10x per step is exploding."""
    rng = np.random.default_rng(0)
    healthy = [0.17 * (1 + rng.uniform(-0.1, 0.1)) for _ in range(50)] + \
              [0.17 * 60 ** min(1.0, k / 20) * (1 + rng.uniform(-0.3, 0.3)) for k in range(300)]
    det = ExplodingDetector()
    assert not any(det.update(v, [v], s) for s, v in enumerate(healthy)) and det.alerts(["w"]) == []
    det = ExplodingDetector()
    blowup = [1.0] * 10 + [10.0 ** k for k in range(1, 12)]
    flags = [det.update(v, [v], s) for s, v in enumerate(blowup)]
    # 1000x its first steps from step 13 on: the third step in a row (15) fires, with 6 steps to go to 1e11
    assert flags.index(True) == 15 and det.alerts(["w"])[0].step == 15


# ----------------------------------------------------------------- nonfinite

def test_nonfinite_names_parameters_of_the_first_bad_step_and_counts_steps():
    det = NonFiniteDetector()
    det.update(torch.tensor([False, False, False, False]), _t(0, torch.int64))
    det.update(torch.tensor([False, True, False, True]), _t(1, torch.int64))
    det.update(torch.tensor([True, False, False, False]), _t(2, torch.int64))
    (alert,) = _read(det)
    assert alert.where == "l1.weight, head.weight" and alert.step == 1 and alert.value == 2.0
    assert "first l1.weight" in alert.message
    assert _read(det) == []  # reported once


# ----------------------------------------------------------------- spike

def _reference_spikes(xs, z, alpha, warmup, min_std):
    """The same rule, written as a plain float64 loop."""
    mean = var = 0.0
    seen, out = 0, []
    for i, x in enumerate(xs):
        y = math.log(x)
        std = max(math.sqrt(var), min_std)
        if seen >= warmup and (y - mean) / std > z:
            out.append(i)
        y = min(y, mean + z * std)
        a = max(1.0 / (seen + 1), alpha)
        d = y - mean
        mean += a * d
        var = 0.0 if seen == 0 else (1 - a) * (var + a * d * d)
        seen += 1
    return out


def test_spike_flags_the_same_steps_as_a_reference_loop():
    g = torch.Generator().manual_seed(0)
    xs = (torch.exp(torch.randn(300, generator=g, dtype=torch.float64) * 0.3) * 2.0).tolist()
    for i in (60, 61, 150, 220):
        xs[i] *= 30
    det = SpikeDetector("loss", z=5.0, alpha=0.05, warmup=20, min_std=0.1)
    got = []
    for i, x in enumerate(xs):
        if det.update(_t(x), _t(i, torch.int64)).item():
            got.append(i)
    assert got == _reference_spikes(xs, 5.0, 0.05, 20, 0.1)
    assert {60, 61, 150, 220} <= set(got)
    (alert,) = det.alerts()
    assert alert.kind == "spike" and alert.step == got[0] and alert.where == "loss"


def test_spike_is_silent_on_a_smoothly_decreasing_noisy_loss():
    g = torch.Generator().manual_seed(1)
    det = SpikeDetector("loss")
    for i in range(500):
        x = 2.3 * math.exp(-i / 100) + 0.05 + 0.1 * torch.rand((), generator=g).item()
        det.update(_t(x), _t(i, torch.int64))
    assert det.alerts() == []


# ----------------------------------------------------------------- state, errors

@pytest.mark.parametrize("make", [lambda: VanishingDetector(patience=2), lambda: ExplodingDetector(warmup=2),
                                  NonFiniteDetector, lambda: SpikeDetector(warmup=2)])
def test_state_dict_round_trip_continues_identically(make):
    a, b = make(), make()

    def feed(det, steps):
        for s in steps:
            v = 1.0 + (s % 3) if s != 7 else 1e4
            g = torch.tensor([v * 1e-9, v, float("nan") if s == 8 else v])
            if isinstance(det, VanishingDetector):
                det.update(g, torch.ones(3), _t(s, torch.int64))
            elif isinstance(det, ExplodingDetector):
                det.update(_t(v), g, _t(s, torch.int64))
            elif isinstance(det, NonFiniteDetector):
                det.update(~torch.isfinite(g), _t(s, torch.int64))
            else:
                det.update(_t(v), _t(s, torch.int64))

    feed(a, range(5))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    feed(a, range(5, 10))
    feed(b, range(5, 10))
    for key, value in a.state_dict().items():
        assert torch.equal(value.nan_to_num(-1), b.state_dict()[key].nan_to_num(-1)), key


def test_vanishing_refuses_a_checkpoint_of_another_size():
    det = VanishingDetector()
    det.load_state_dict({"run": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="shape"):
        det.update(torch.ones(4), torch.ones(4), _t(0, torch.int64))


@pytest.mark.parametrize("make,match", [
    (lambda: VanishingDetector(rel_max=0.0), "rel_max=0.0 is invalid"),
    (lambda: VanishingDetector(patience=0), "patience=0 is invalid: expected an integer >= 1"),
    (lambda: ExplodingDetector(factor=1.0), "factor=1.0 is invalid"),
    (lambda: ExplodingDetector(max_norm=-1.0), "max_norm=-1.0 is invalid"),
    (lambda: SpikeDetector(alpha=1.0), "alpha=1.0 is invalid"),
    (lambda: SpikeDetector(z=-3), "z=-3 is invalid"),
])
def test_bad_arguments_are_named(make, match):
    with pytest.raises(BpkitConfigError, match=match):
        make()


def test_alerts_are_bpkit_alerts():
    det = NonFiniteDetector()
    det.update(torch.tensor([True]), _t(3, torch.int64))
    (alert,) = det.alerts(["w"])
    assert isinstance(alert, Alert) and str(alert).startswith("[bpkit nonfinite @ step 3]")
