"""SCE as FuseChat released it (variant="fusechat") against a plain re-derivation of FuseChat's merge code,
and how it relates to mergekit's sce (variant="code")."""
from __future__ import annotations

import pytest
import torch

from fusionlab.merge.methods import sce


def fusechat_sce_by_hand(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """FuseChat's sce_merging.py written out entry by entry in Python floats: the top-τ variance mask enters
    only η_j = Σ(δ_j·mask)² / numel (normalised; uniform if all 0); the FULL deltas are sign-erased (majority
    sign = sign of Σ_j δ_j, ties +; a zero delta never agrees) and averaged over the kept weights (0 → 1)."""
    n, base_flat = len(tensors), base.reshape(-1).tolist()
    deltas = [[x - b for x, b in zip(t.reshape(-1).tolist(), base_flat)] for t in tensors]
    m = len(base_flat)
    mask = [1.0] * m
    if select_topk < 1:
        variance = []
        for i in range(m):
            mean = sum(d[i] for d in deltas) / n
            variance.append(sum((d[i] - mean) ** 2 for d in deltas) / n)
        k = int(select_topk * sum(v != 0 for v in variance))
        top = sorted(range(m), key=lambda i: variance[i], reverse=True)[:k]
        mask = [1.0 if i in top else 0.0 for i in range(m)]
    energy = [sum((d[i] * mask[i]) ** 2 for i in range(m)) / m for d in deltas]
    eta = [1.0 / n] * n if sum(energy) == 0 else [e / sum(energy) for e in energy]
    out = []
    for i in range(m):
        majority = 1.0 if sum(d[i] for d in deltas) >= 0 else -1.0
        weights = [eta[j] if (deltas[j][i] > 0) - (deltas[j][i] < 0) == majority else 0.0 for j in range(n)]
        divisor = sum(weights) or 1.0
        out.append(base_flat[i] + sum(w * d[i] for w, d in zip(weights, deltas)) / divisor)
    return torch.tensor(out, dtype=base.dtype).reshape(base.shape)


def models(seed: int = 0, shape=(6, 5), n: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    tensors = [base + torch.randn(shape, generator=g, dtype=torch.float64) * (j + 1) for j in range(n)]
    tensors[0][0, 0] = base[0, 0]  # a zero delta: never agrees with the elected sign
    for j, d in enumerate((1.0, -1.0, 0.0)):  # Σδ = 0 exactly: the tie elects +, only model 0 kept
        tensors[j][0, 1] = base[0, 1] + d
    for t in tensors:  # equal deltas: zero variance, not counted in the top-τ share
        t[0, 2] = base[0, 2] + 0.5
    return base, tensors


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_fusechat_variant_equals_fusechat_released_formula(select_topk, seed):
    base, tensors = models(seed)
    want = fusechat_sce_by_hand(base, tensors, select_topk)
    torch.testing.assert_close(sce(base, tensors, select_topk=select_topk, variant="fusechat"), want,
                               rtol=1e-12, atol=1e-12)
    assert want[0, 1] == base[0, 1] + 1.0  # the Σδ = 0 tie: + elected, only model 0's +1 kept


def test_fusechat_and_mergekit_agree_at_full_selection_and_differ_at_fusechat_tau():
    base, tensors = models(2, shape=(8, 10))
    full_fc, full_code = (sce(base, tensors, select_topk=1.0, variant=v) for v in ("fusechat", "code"))
    torch.testing.assert_close(full_fc, full_code, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sce(base, tensors, select_topk=1.0, variant="paper"), full_code)
    tau_fc, tau_code = (sce(base, tensors, select_topk=0.1, variant=v) for v in ("fusechat", "code"))
    # mergekit zeroes 90% of the deltas (those entries stay at the base); FuseChat merges every delta
    unchanged_code = (tau_code == base).float().mean().item()
    assert unchanged_code >= 0.85 and (tau_fc == base).float().mean().item() < 0.1
    assert not torch.allclose(tau_fc, tau_code)
    assert not torch.allclose(tau_fc, full_fc)  # the mask still changes η


def test_sce_fusechat_config_reproduces_fusechat_released_settings(compose):
    from omegaconf import OmegaConf

    cfg = compose(["+experiment=fusechat_merge", "merge_method=sce_fusechat"])
    assert cfg.merge.method == "sce"
    assert OmegaConf.to_container(cfg.merge.parameters) == {"select_topk": 0.1, "variant": "fusechat"}
    default = compose(["+experiment=fusechat_merge"])  # mergekit's sce at τ = 1.0, where both coincide
    assert default.merge.method == "sce" and not default.merge.parameters
