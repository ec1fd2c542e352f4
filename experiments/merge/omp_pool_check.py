"""How close is fusionlab's pooled OMP (``fusionlab.merge.tokenizer.omp``, search over each target's top-m anchors)
to exact OMP (mergekit 0.1.5's ``batch_omp``, every anchor at every step) on the real tokensurgeon pair?

Targets: a fixed random sample of the Gemma-3-270M tokens SmolLM2 lacks (seed 0), their rows of Gemma-3's
embedding; atoms: Gemma-3's rows of the tokens both vocabularies spell (fusionlab's byte matching). Reported per
(k, m): mean relative residual ‖y − Σ c a‖/‖y‖ in Gemma's space, the share of mergekit's chosen anchors that
ours chose too, the cosine between the SmolLM2 rows the two codes give, and seconds per 256 targets (1 thread).
Uses only donor-space geometry: no held-out text is read, so the pool size chosen from it is not tuned on the test.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/merge/omp_pool_check.py [--n 512]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from mergekit.tokensurgeon import batch_omp
    from transformers import AutoTokenizer

    from fusionlab.merge.io import CheckpointReader
    from fusionlab.merge.tokenizer import omp, surfaces
    from fusionlab.models import embedded_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--grid", default="64:128,64:256,64:512,4:16,4:64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sm, gm = embedded_checkpoint("smollm2_135m"), embedded_checkpoint("gemma3_270m")
    s_surf, g_surf = surfaces(AutoTokenizer.from_pretrained(str(sm))), surfaces(AutoTokenizer.from_pretrained(str(gm)))
    s_index = {}
    for i, s in enumerate(s_surf):
        if s:
            s_index.setdefault(s, i)
    E_s = CheckpointReader(sm).get("model.embed_tokens.weight")
    E_g = CheckpointReader(gm).get("model.embed_tokens.weight")
    pairs, seen, missing = [], set(), []
    for gid, s in enumerate(g_surf[:E_g.shape[0]]):
        if s and s in s_index:
            if s not in seen:
                seen.add(s)
                pairs.append((s_index[s], gid))
        else:
            missing.append(gid)
    own, don = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    pick = torch.tensor(missing)[torch.randperm(len(missing), generator=torch.Generator().manual_seed(0))[:args.n]]
    Y, A, B = E_g[pick], E_g[don], E_s[own]
    out = {"anchors": len(pairs), "missing": len(missing), "targets": len(pick), "rows": []}
    for spec in args.grid.split(","):
        k, m = map(int, spec.split(":"))
        t = time.perf_counter()
        i_ref, c_ref = batch_omp(Y, A, k)
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        i_us, c_us = omp(Y, A, k, candidates=m)
        t_us = time.perf_counter() - t

        def resid(i, c):
            return float(((Y - torch.einsum("nk,nkd->nd", c, A[i])).norm(dim=1) / Y.norm(dim=1)).mean())

        r_ref, r_us = torch.einsum("nk,nkd->nd", c_ref, B[i_ref]), torch.einsum("nk,nkd->nd", c_us, B[i_us])
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i_ref, i_us)) / (k * len(pick))
        row = {"k": k, "m": m, "resid_mergekit": round(resid(i_ref, c_ref), 4), "resid_fusionlab": round(resid(i_us, c_us), 4),
               "support_overlap": round(overlap, 4),
               "row_cosine_mean": round(float(torch.nn.functional.cosine_similarity(r_ref, r_us, dim=1).mean()), 4),
               "row_cosine_min": round(float(torch.nn.functional.cosine_similarity(r_ref, r_us, dim=1).min()), 4),
               "s_per_256_mergekit": round(t_ref * 256 / len(pick), 3), "s_per_256_fusionlab": round(t_us * 256 / len(pick), 3)}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
