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


# ----------------------------------------------------------------- sampled histograms and the CPU one-read paths

from bpkit.stats.sampling import sample_layout, strided_sample  # noqa: E402


@pytest.mark.parametrize("shape,samples", [((512, 512), 4096), ((10, 513), 100), ((64, 3, 3, 3), 50),
                                           ((1000,), 999), ((7,), 3), ((33, 31), 64)])
def test_strided_samples_cover_every_element_once_over_stride_phases(shape, samples):
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).view(shape)
    run, stride = sample_layout(shape, samples)
    assert not any(d % stride == 0 for d in shape if d > 1 and stride > 1)
    picked = [strided_sample(x, samples, phase) for phase in range(stride)]
    assert all(p.numel() <= samples + run for p in picked)
    seen = torch.cat([p.reshape(-1) for p in picked])
    assert sorted(seen.tolist()) == list(range(x.numel()))


def test_strided_sample_of_a_non_contiguous_tensor():
    x = torch.randn(300, 200).t()  # a transposed view
    picked = [strided_sample(x, 1000, phase) for phase in range(sample_layout((200, 300), 1000)[1])]
    assert sorted(torch.cat([p.reshape(-1) for p in picked]).tolist()) == sorted(x.reshape(-1).tolist())


def test_sampled_histograms_are_exact_for_small_tensors_and_close_for_big_ones():
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(40, 50, generator=g), torch.zeros(30), torch.tensor([float("nan"), 1e-30, 0.0])]
    assert torch.equal(log_histograms(small, samples=4096, phase=5), log_histograms(small))
    big = [torch.randn(512, 512, generator=g) * 10 ** torch.randint(-6, 2, (512, 1), generator=g), torch.randn(5000)]
    big[0][::7] = 0.0
    exact = log_histograms(big)
    sampled = log_histograms(big, samples=4096, phase=3)
    assert sampled.shape == exact.shape and sampled.dtype == torch.int64
    # scaled to the tensor's size (rounding per bin), and each bin's share within a few points of the exact one
    assert (sampled.sum(1) - exact.sum(1)).abs().max() <= exact.shape[1]
    share = sampled[0].double() / sampled[0].sum()
    assert (share - exact[0].double() / exact[0].sum()).abs().max() < 0.03
    assert torch.equal(exact[1], log_histograms([big[1]], samples=8192)[0])  # 5000 elements: all of them


def test_sampled_histograms_over_every_phase_add_up_to_the_exact_counts():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(96, 200, generator=g) * 10 ** torch.randint(-9, 3, (96, 200), generator=g).float()
    run, stride = sample_layout(tuple(t.shape), 1000)
    counts = sum(log_histograms([strided_sample(t, 1000, p).reshape(-1)]) for p in range(stride))
    assert torch.equal(counts, log_histograms([t]))


def test_sampled_histograms_group_rows_and_validate():
    ts = [torch.randn(300, 300), torch.randn(300), torch.randn(100, 300)]
    seg = torch.tensor([0, 0, 1])
    rows = log_histograms(ts, samples=2048, segment_ids=seg, num_segments=2)
    per_tensor = log_histograms(ts, samples=2048)
    assert torch.equal(rows, torch.stack([per_tensor[0] + per_tensor[1], per_tensor[2]]))
    with pytest.raises(BpkitConfigError, match="samples"):
        log_histograms(ts, samples=0)


def test_cpu_one_read_max_and_update_norms_of_big_tensors_against_float64():
    from bpkit.stats.norms import foreach_max_abs
    from bpkit.stats.updates import snapshot, update_norms

    g = torch.Generator().manual_seed(2)
    params = [torch.randn(400, 300, generator=g), torch.randn(300, generator=g), torch.randn(50, 400, generator=g)]
    params[2][3, 4] = -40.0
    maxima = foreach_max_abs(params)  # above 64k elements: the aminmax path
    assert maxima.tolist() == [p.abs().max().item() for p in params]
    params[1][7] = float("nan")
    assert torch.isnan(foreach_max_abs(params)[1]) and foreach_max_abs(params)[2] == 40.0
    params[1][7] = 0.0
    before = [p.double().clone() for p in params]
    snap = snapshot(params)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    upd = update_norms(params, snap)
    ref = [(p.double() - b).norm().item() for p, b in zip(params, before)]
    assert upd.tolist() == pytest.approx(ref, rel=1e-4)
