"""The O(n) replay of torch's sort/topk picks exactly the entries torch picks, ties included."""
import sys

import numpy as np
import pytest
import torch

from fusionlab.merge.fast import exact as S

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torch's CPU sort is libstdc++'s only on Linux builds")


def torch_set(w, k, descending, kind):
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    if kind == "topk":
        mask[torch.topk(w, k, largest=descending).indices] = True
    else:
        mask[torch.sort(w, descending=descending).indices[:k]] = True
    return mask


def replayed_set(w, k, descending, kind):
    got = S._replay(w.numpy().copy(), k, descending, S._SORT_THRESHOLD if kind == "sort" else S._SELECT_THRESHOLD)
    assert got is not None
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.from_numpy(got).long()] = True
    return mask


@linux_only
def test_replay_is_available_on_this_torch_build():
    assert S.replay_available()


@linux_only
@pytest.mark.parametrize("kind", ["sort", "topk"])
def test_replay_equals_torch_on_tie_heavy_inputs(kind):
    g = torch.Generator().manual_seed(7)
    differs_from_stable = 0
    for trial in range(150):
        n = int(torch.randint(2, 30000, (1,), generator=g))
        levels = int(torch.randint(1, 60, (1,), generator=g))
        w = torch.randint(0, levels, (n,), generator=g).float() * 0.5
        k = int(torch.randint(1, n, (1,), generator=g))
        if kind == "topk" and k * 64 <= n:
            k = n // 2 + 1  # torch.topk uses partial_sort below n/64 (not replayed)
        for descending in (True, False):
            want = torch_set(w, k, descending, kind)
            assert torch.equal(replayed_set(w, k, descending, kind), want), (trial, n, levels, k, descending)
            assert torch.equal(S.reference_prefix_mask(w, k, descending, kind), want)
            stable = torch.zeros(n, dtype=torch.bool)
            stable[torch.sort(w, descending=descending, stable=True).indices[:k]] = True
            differs_from_stable += int(not torch.equal(stable, want))
    assert differs_from_stable > 100  # the inputs do exercise the unstable tie order


@linux_only
def test_replay_on_ulp_ties_of_a_perturbed_weight_matrix():
    """What TIES sees: |fine-tuned - base| on the ulp grid of the base, many equal magnitudes."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 576, generator=g)
    tuned = base + torch.randn(base.shape, generator=g) * 1e-5
    w = (tuned - base).abs().reshape(-1)
    n = w.numel()
    for density in (0.1, 0.3, 0.5, 0.9):
        k = int(density * n)
        cut = torch.kthvalue(w, n - k + 1).values
        want = torch_set(w, k, True, "sort")
        assert torch.equal(S.reference_prefix_mask(w, k, True, "sort"), want)
        if density == 0.5:
            assert int((w == cut).sum()) > 1  # equal magnitudes at the cut


def test_small_edges_and_nan_fall_back_to_torch():
    w = torch.tensor([3.0, 1.0, 3.0, float("nan"), 2.0])
    assert torch.equal(S.reference_prefix_mask(w, 2, True), torch_set(w, 2, True, "sort"))
    w = torch.tensor([1.0, 1.0, 1.0])
    assert S.reference_prefix_mask(w, 0).sum() == 0 and S.reference_prefix_mask(w, 3).all()
    for n in range(2, 40):
        w = (torch.arange(n) % 3).float()
        for k in range(1, n):
            assert torch.equal(S.reference_prefix_mask(w, k, False), torch_set(w, k, False, "sort"))


def test_overwrite_reorders_only_when_asked():
    w = torch.randint(0, 5, (5000,)).float()
    before = w.clone()
    S.reference_prefix_mask(w, 1234, True)
    assert torch.equal(w, before)


def test_rank_range_mask_is_a_slice_of_the_reference_sort():
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 9, (4000,), generator=g).float()
    want = torch.zeros(4000, dtype=torch.bool)
    want[torch.sort(w).indices[300:3500]] = True
    assert torch.equal(S.rank_range_mask(w, 300, 3500), want)
    assert torch.equal(S.rank_range_mask(w, 300, 3500, tie_break="index").nonzero(),
                       torch.sort(w, stable=True).indices[300:3500].sort().values.unsqueeze(1))


def test_replay_declines_where_the_reference_would_heapsort():
    """Once 2·log2(n) partitions are used up, std::sort heapsorts the segment: not replayed."""
    a = np.random.default_rng(0).integers(0, 5, 1000).astype(np.float32)
    assert S._replay(a.copy(), 500, True, S._SORT_THRESHOLD, depth=1) is None
    assert S._replay(a.copy(), 500, True, S._SORT_THRESHOLD) is not None


@pytest.mark.parametrize("count", [2, 3, 4])
def test_population_variance_is_torch_var_bit_for_bit(count):
    g = torch.Generator().manual_seed(count)
    base = torch.randn(300, 257, generator=g)
    x = torch.stack([base + torch.randn(base.shape, generator=g) * 1e-4 for _ in range(count)]) - base
    x[:, :3] = 0.0  # zero variance rows
    x[0, 5] = 1e30  # large spread
    want = torch.var(x, dim=0, unbiased=False)
    got = S.population_variance(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # not just any variance: the two-pass float32 formula differs in the last bits somewhere
    two_pass = ((x - x.mean(dim=0)) ** 2).mean(dim=0)
    assert not torch.equal(two_pass, want)
