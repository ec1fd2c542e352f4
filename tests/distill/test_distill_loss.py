"""The fusion loss against a hand computation; assistant-only masking; MinCE / AvgCE / KL."""
from __future__ import annotations

import math

import pytest
import torch

from fusionlab.distill.loss import fusion_loss


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def softmax(vals):
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    return [x / sum(e) for x in e]


Z = [[0.1, 0.5, -0.3, 1.2], [2.0, -1.0, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]]
LABELS = [1, 2, 3]  # position 0 is an instruction token below; positions 1, 2 are assistant tokens
TIDS = [[[1, 2], [2, -1], [0, 3]],  # candidate 0 (pivot)
        [[3, 0], [2, 1], [1, 2]]]  # candidate 1 (source)
TLOG = [[[1.0, 0.0], [0.5, -math.inf], [0.0, 0.0]],
        [[2.0, 1.0], [0.3, 0.9], [1.0, 1.0]]]


def batch(labels=LABELS, ce=(2.0, 1.0)):
    return dict(logits=torch.tensor([Z]), labels=torch.tensor([labels]), target_ids=torch.tensor([TIDS]),
                target_logits=torch.tensor([TLOG]), ce=torch.tensor([list(ce)]))


def hand(lam, T, m_weights, labels=LABELS):
    clm, fus, n = 0.0, 0.0, 0
    for t in range(len(Z) - 1):
        if labels[t + 1] == -100:
            continue
        n += 1
        lp = log_softmax(Z[t])
        clm += -lp[labels[t + 1]]
        for m, w in enumerate(m_weights):
            valid = [(i, l) for i, l in zip(TIDS[m][t], TLOG[m][t]) if i >= 0]
            p = softmax([l / T for _, l in valid])
            fus += w * -sum(pi * lp[i] for pi, (i, _) in zip(p, valid))
    return lam * clm / n + (1 - lam) * fus / n, clm / n, fus / n


@pytest.mark.parametrize("lam,T", [(0.9, 1.0), (0.5, 0.5), (0.0, 2.0)])
def test_min_ce_loss_equals_hand_computation(lam, T):
    out = fusion_loss(**batch(), lam=lam, temperature=T, mode="min_ce")
    want, clm, fus = hand(lam, T, [0.0, 1.0])  # candidate 1 has the lower CE
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["clm"].item() == pytest.approx(clm, rel=1e-6)
    assert out["fusion"].item() == pytest.approx(fus, rel=1e-6)
    assert out["tokens"].item() == 2


def test_min_ce_picks_the_candidate_with_lower_ce():
    out = fusion_loss(**batch(ce=(0.5, 3.0)), lam=0.0, mode="min_ce")
    assert out["loss"].item() == pytest.approx(hand(0.0, 1.0, [1.0, 0.0])[0], rel=1e-6)


def test_avg_ce_weights_are_softmax_of_minus_ce():
    ce = (2.0, 1.0)
    w = softmax([-c for c in ce])
    out = fusion_loss(**batch(ce=ce), lam=0.0, mode="avg_ce")
    assert out["loss"].item() == pytest.approx(hand(0.0, 1.0, w)[0], rel=1e-6)


def test_kl_is_ce_minus_target_entropy_and_nonnegative():
    b = batch()
    ce_loss = fusion_loss(**b, lam=0.0, loss_type="ce")["fusion"].item()
    kl_loss = fusion_loss(**b, lam=0.0, loss_type="kl")["fusion"].item()
    ent = 0.0
    for t in (0, 1):
        p = softmax(TLOG[1][t])
        ent += -sum(x * math.log(x) for x in p)
    assert kl_loss == pytest.approx(ce_loss - ent / 2, rel=1e-6)
    assert kl_loss >= 0


def test_instruction_tokens_are_masked():
    labels = [1, -100, 3]  # position 0 predicts an instruction token: it must not count
    b = batch(labels=labels)
    logits = b["logits"].clone().requires_grad_(True)
    out = fusion_loss(**{**b, "logits": logits}, lam=0.7)
    assert out["loss"].item() == pytest.approx(hand(0.7, 1.0, [0.0, 1.0], labels)[0], rel=1e-6)
    out["loss"].backward()
    assert torch.all(logits.grad[0, 0] == 0) and torch.all(logits.grad[0, 2] == 0)
    assert torch.any(logits.grad[0, 1] != 0)
    b2 = batch(labels=labels)
    b2["logits"][0, 0] += torch.tensor([5.0, -3.0, 1.0, 0.0])
    assert fusion_loss(**b2, lam=0.7)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
