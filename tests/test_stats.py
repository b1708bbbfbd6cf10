"""bpkit.stats against independent references: float64 torch, clip_grad_norm_, hand-written loops."""

import bisect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpkit.stats.grads import grad_stats
from bpkit.stats.histograms import LogHistogramSpec, log_histograms
from bpkit.stats.norms import foreach_max_abs, foreach_norms, group_max, group_norms, total_norm
from bpkit.stats.updates import snapshot, update_norms, update_ratios
from tests._helpers import OpRecorder


def _tensors(seed=0, shapes=((7, 5), (5,), (3, 4, 2), (1,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 10 ** torch.empty(()).uniform_(-6, 2, generator=g) for s in shapes]


def test_grad_stats_match_float64_reference_and_clip_grad_norm():
    grads, params = _tensors(0), _tensors(1)
    s = grad_stats(grads, params, max_abs=True)
    for i, (g, p) in enumerate(zip(grads, params)):
        assert s.norms[i].item() == pytest.approx(torch.linalg.vector_norm(g.double()).item(), rel=1e-6)
        assert s.max_abs[i].item() == pytest.approx(g.double().abs().max().item(), rel=1e-7)
        assert s.weight_norms[i].item() == pytest.approx(torch.linalg.vector_norm(p.double()).item(), rel=1e-6)
    flat = torch.cat([g.double().reshape(-1) for g in grads])
    assert s.total.item() == pytest.approx(flat.norm().item(), rel=1e-6)
    copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for c, g in zip(copies, grads):
        c.grad = g.clone()
    clip_total = torch.nn.utils.clip_grad_norm_(copies, max_norm=float("inf"))
    assert s.total.item() == pytest.approx(clip_total.item(), rel=1e-6)
    assert not s.nonfinite.any()


def test_grad_stats_low_precision_grads_are_reported_in_float32():
    grads = [t.to(torch.bfloat16) for t in _tensors(2)] + [t.half() for t in _tensors(3, ((4, 4),))]
    s = grad_stats(grads)
    assert s.norms.dtype == torch.float32 and s.weight_norms is None and s.max_abs is None
    ref = [torch.linalg.vector_norm(g.double()).item() for g in grads]
    assert s.norms.tolist() == pytest.approx(ref, rel=1e-2)


def test_nonfinite_flags_nan_inf_and_float32_overflow_like_clip_grad_norm():
    grads = [torch.tensor([1e20, 1e20]), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 0.0]),
             torch.zeros(3), torch.full((4,), 6e4, dtype=torch.float16)]
    s = grad_stats(grads, max_abs=True)
    ref = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g, dtype=torch.float32))
        p.grad = g.float().clone()
        ref.append(not math.isfinite(torch.nn.utils.clip_grad_norm_([p], float("inf")).item()))
    assert s.nonfinite.tolist() == ref == [True, True, True, False, False]
    assert s.norms[4].item() == pytest.approx(1.2e5, rel=1e-3)  # accumulated in float32: no fp16 overflow
    assert foreach_max_abs(grads)[0].item() == pytest.approx(1e20, rel=1e-6)
    assert math.isnan(s.max_abs[1].item()) and math.isinf(s.max_abs[2].item())


def test_foreach_norms_and_total_norm_keep_their_contract():
    ts = _tensors(4)
    n = foreach_norms(ts, 1.0)
    assert n.tolist() == pytest.approx([t.double().abs().sum().item() for t in ts], rel=1e-6)
    assert total_norm(foreach_norms(ts, float("inf")), float("inf")).item() == max(t.abs().max().item() for t in ts)
    assert foreach_norms([]).numel() == 0 and total_norm(torch.zeros(0)).item() == 0.0


def test_group_norms_and_max_equal_norms_of_the_concatenated_groups():
    ts = _tensors(5)
    index = torch.tensor([0, 1, 0, 1])
    got = group_norms(foreach_norms(ts), index, 2)
    for grp in (0, 1):
        members = torch.cat([t.double().reshape(-1) for t, i in zip(ts, index.tolist()) if i == grp])
        assert got[grp].item() == pytest.approx(members.norm().item(), rel=1e-6)
    mx = group_max(torch.tensor([1.0, 5.0, float("nan"), 2.0]), torch.tensor([0, 0, 1, 1]), 2)
    assert mx[0].item() == 5.0 and math.isnan(mx[1].item())


def _reference_row(t: torch.Tensor, spec: LogHistogramSpec) -> list[int]:
    """A hand-written loop: one value at a time, float64, bisect over the edges."""
    bounds = spec.boundaries().tolist()
    row = [0] * spec.row_size
    for v in t.double().reshape(-1).tolist():
        if not math.isfinite(v):
            row[-1] += 1
        elif v == 0:
            row[-2] += 1
        else:
            row[bisect.bisect_right(bounds, math.log10(abs(v)))] += 1
    return row


def test_histograms_match_a_hand_written_loop_and_count_zeros_and_nonfinite():
    ts = _tensors(6, ((50, 8), (30,), (2, 3, 4)))
    ts[0][0, :3] = torch.tensor([0.0, float("nan"), float("inf")])
    ts[1][:2] = torch.tensor([1e-30, 1e9])  # under- and overflow
    ts.append(torch.randn(10, dtype=torch.float64))  # a second dtype group
    spec = LogHistogramSpec(-12, 4, 2)
    h = log_histograms(ts, spec)
    assert h.shape == (4, spec.row_size)
    for row, t in zip(h.tolist(), ts):
        assert row == _reference_row(t, spec)
        assert sum(row) == t.numel()
    assert h[0, -1].item() == 2 and h[0, -2].item() == 1 and h[1, 0].item() >= 1 and h[1, spec.num_bins + 1] == 1


def test_histograms_by_segment_sum_their_members():
    ts = _tensors(7)
    spec = LogHistogramSpec(-8, 2, 4)
    per_tensor = log_histograms(ts, spec)
    grouped = log_histograms(ts, spec, torch.tensor([1, 0, 1, 1]), 2)
    assert torch.equal(grouped[0], per_tensor[1])
    assert torch.equal(grouped[1], per_tensor[0] + per_tensor[2] + per_tensor[3])
    edges = spec.edges()
    assert len(edges) == spec.num_bins + 3 and len(LogHistogramSpec.split(grouped[0].numpy())[0]) == len(edges) - 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_histogram_rows_always_sum_to_numel(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=g) * 10 ** torch.randint(-15, 8, (n,), generator=g) for n in sizes]
    ts[0][0] = float("nan")
    assert log_histograms(ts).sum(1).tolist() == sizes


def test_update_ratio_is_the_exact_step_over_the_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    before64 = [p.detach().double().clone() for p in params]
    snap = snapshot(params)
    opt.step()
    upd = update_norms(params, snap)
    ref = [(p.detach().double() - b).norm().item() for p, b in zip(params, before64)]
    assert upd.tolist() == pytest.approx(ref, rel=1e-5)
    ratios = update_ratios(upd, foreach_norms(before64).float())
    assert ratios.tolist() == pytest.approx([r / b.norm().item() for r, b in zip(ref, before64)], rel=1e-5)




@pytest.mark.parametrize("fn", ["grad_stats", "histograms", "updates"])
def test_kernel_count_does_not_grow_with_the_number_of_tensors(fn):
    counts = []
    for n in (10, 200):
        ts = [torch.randn(3, 2) for _ in range(n)]
        snap = snapshot(ts)
        with OpRecorder() as mode:
            if fn == "grad_stats":
                grad_stats(ts, ts, max_abs=True)
            elif fn == "histograms":
                log_histograms(ts)
            else:
                update_norms(ts, snap)
        counts.append(mode.kernels())
    assert counts[0] == counts[1]
    assert len(counts[0]) < 40
