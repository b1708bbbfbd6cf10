"""The fast statistics paths give the same numbers as the reference paths (issue 22)."""

import numpy as np
import pytest
import torch

from bpkit.errors import BpkitConfigError
from bpkit.stats import histograms as H
from bpkit.stats.grads import grad_stats
from bpkit.stats.histograms import LogHistogramSpec, log_histograms, reference_columns


def _nasty(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(300, 300, generator=g) * 10 ** torch.empty(300, 1).uniform_(-46, 39, generator=g)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 1e-40,
                             torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max, 1.0, -1.0])
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, -0x400000], dtype=torch.int32).view(torch.float32)
    return [wide, specials, nans, torch.zeros(5), torch.randn(7, 3, generator=g),
            (torch.randn(20000, generator=g) * 100).half(),  # under float16's 65504 (see the last test)
            (torch.randn(3000, generator=g) * 1e-20).bfloat16(),
            torch.randn(70000, generator=g) * 1e-3]  # above one block of the CPU path


def _edges(spec: LogHistogramSpec) -> torch.Tensor:
    """Every bin edge 10**(k/bpd) as float32, with the 40 float32 neighbours either side of it."""
    edges = torch.tensor(10.0 ** spec.boundaries(), dtype=torch.float32)
    bits = edges.view(torch.int32).to(torch.int64)[:, None] + torch.arange(-40, 41)
    vals = bits.to(torch.int32).view(torch.float32).reshape(-1)
    return torch.cat([vals, -vals])


@pytest.mark.parametrize("spec", [LogHistogramSpec(), LogHistogramSpec(-3.3, 2.1, 3), LogHistogramSpec(-8, 8, 16),
                                  LogHistogramSpec(-30, -20, 1)])
def test_bits_histograms_equal_reference(spec):
    tensors = _nasty(0) + [_edges(spec)]
    fast = log_histograms(tensors, spec)
    ref = log_histograms(tensors, spec, method="reference")
    assert H._bit_tables(spec, torch.device("cpu")) is not None  # the fast path did run
    assert torch.equal(fast, ref)
    assert fast.sum(1).tolist() == [t.numel() for t in tensors]
    # grouped rows too, with the segments out of order
    seg = torch.tensor([2, 0, 2, 1, 0, 1, 2, 0, 1])
    assert torch.equal(log_histograms(tensors, spec, seg, 3), log_histograms(tensors, spec, seg, 3, "reference"))


def test_bits_columns_against_float64_log10():
    """Away from the edges (where float32's log10 rounds), the reference columns are floor(log10|x|) in float64."""
    spec = LogHistogramSpec()
    x = torch.randn(50000, dtype=torch.float64) * 10 ** torch.empty(50000, dtype=torch.float64).uniform_(-14, 6)
    pos = (torch.log10(x.abs()) - spec.low) * spec.bins_per_decade
    x = x[(pos - pos.round()).abs() > 1e-5]  # not within rounding of an edge
    want = torch.clamp(torch.floor((torch.log10(x.abs()) - spec.low) * spec.bins_per_decade) + 1, 0,
                       spec.num_bins + 1).to(torch.int64)
    assert torch.equal(reference_columns(x.float(), spec), want)
    row = log_histograms([x.float()], spec)[0]
    assert torch.equal(row[: spec.num_bins + 2], torch.bincount(want, minlength=spec.num_bins + 2))


def test_bits_path_in_one_buffer_matches_chunks(monkeypatch):
    """The one-buffer path (small tensors, and every device but the CPU) and the CPU per-cell path agree."""
    spec = LogHistogramSpec()
    tensors = _nasty(1)
    cells = log_histograms(tensors, spec)
    monkeypatch.setattr(H, "_CHUNK", 1000)  # many blocks per tensor
    assert torch.equal(log_histograms(tensors, spec), cells)
    monkeypatch.setattr(H, "_CELL_PATH_MIN", 10 ** 12)
    monkeypatch.setattr(H, "_count_cells", None)  # would fail if called
    assert torch.equal(log_histograms(tensors, spec), cells)


def test_unknown_method_is_a_config_error():
    with pytest.raises(BpkitConfigError, match="method"):
        log_histograms([torch.ones(2)], method="fast")


def test_float16_zero_count_beyond_65504():
    """The reference counted zeros with a float16 L0 norm, which overflows at 65504 non-zero elements."""
    x = torch.randn(100000).half()
    x[:10] = 0
    for method in ("auto", "reference"):
        row = log_histograms([x], method=method)[0]
        assert int(row[-2]) == 10 and int(row.sum()) == 100000


def test_grad_stats_against_float64():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(257, 33, generator=g) * 1e-3, torch.randn(5, generator=g), torch.zeros(4),
             (torch.randn(100, generator=g)).half(), torch.randn(70000, generator=g)]
    params = [torch.randn_like(t, dtype=torch.float32) for t in grads]
    s = grad_stats(grads, params, max_abs=True)
    for i, t in enumerate(grads):
        d = t.double()
        assert s.norms[i].item() == pytest.approx(d.norm().item(), rel=1e-5)
        assert s.max_abs[i].item() == d.abs().max().item()
        assert s.weight_norms[i].item() == pytest.approx(params[i].double().norm().item(), rel=1e-5)
    total = np.sqrt(sum(t.double().pow(2).sum().item() for t in grads))
    assert s.total.item() == pytest.approx(total, rel=1e-5)
