"""Token alignment speed: fusionlab (exact offsets + segment DTW) vs a reference-style pure-Python DTW.

The reference (FuseChat `align_token_and_vocab.py`) fills the full n×m DTW matrix in a Python
double loop with a C edit distance per cell, then backtraces. ``reference_dtw`` below mirrors
that structure (rapidfuzz's Levenshtein stands in for the `editdistance` package).

    python experiments/distill/bench_align.py                 # 512 and 2048 tokens
    python experiments/distill/bench_align.py --lengths 512 --ref-reps 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def reference_dtw(series_1: list[str], series_2: list[str]) -> list[list[int]]:
    """Full-matrix DTW as in the reference; returns per series_2 position the aligned series_1 positions."""
    from rapidfuzz.distance import Levenshtein

    def dist(a, b):
        w = 0.1 if (a in b or b in a) else 1.0
        return Levenshtein.distance(a, b) * w

    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, v1 in enumerate(series_1):
        for j, v2 in enumerate(series_2):
            matrix[i + 1, j + 1] = dist(v1, v2) + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    map2 = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        map2[j].append(i)
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    map2[0].append(0)
    return [sorted(m) for m in map2]


def make_sample(pivot_tok, source_tok, n_tokens: int):
    """One long text of real conversations in the pivot's chat template, cut at n_tokens pivot tokens."""
    from fusionlab.distill.conversations import load_conversations, render
    from fusionlab.align.vocab import strip_marker, token_surfaces

    from pathlib import Path

    import fusionlab

    convs = load_conversations(Path(fusionlab.__file__).parent / "data" / "chat" / "fusechat_mini.jsonl")
    text = ""
    for c in convs:
        text += render(pivot_tok, c["messages"])[0]
        if len(pivot_tok(text, add_special_tokens=False)["input_ids"]) > n_tokens:
            break
    enc = pivot_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    text = text[: enc["offset_mapping"][n_tokens - 1][1]]
    out = {}
    for side, tok in (("pivot", pivot_tok), ("source", source_tok)):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        surf = token_surfaces(tok)
        out[side] = (np.asarray(e["offset_mapping"]), [strip_marker(surf[i]) for i in e["input_ids"]])
    return out


def main() -> None:
    from fusionlab.align.token_align import align_tokens
    from fusionlab.models import ModelSpec, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ref-reps", type=int, default=1)
    args = ap.parse_args()
    pt = load_tokenizer(ModelSpec(name="p", source="embedded", path="smollm2_135m"))
    st = load_tokenizer(ModelSpec(name="s", source="embedded", path="gemma3_270m"))
    rows = []
    for n in args.lengths:
        s = make_sample(pt, st, n)
        (po, ps), (so, ss) = s["pivot"], s["source"]
        align_tokens(po, so, ps, ss)  # warm-up
        t = time.perf_counter()
        for _ in range(args.reps):
            ours = align_tokens(po, so, ps, ss)
        ours_s = (time.perf_counter() - t) / args.reps
        t = time.perf_counter()
        for _ in range(args.ref_reps):
            ref = reference_dtw(ss, ps)
        ref_s = (time.perf_counter() - t) / args.ref_reps
        same = np.mean([ours.aligned(i) == ref[i] for i in range(len(ps))])
        rows.append({"pivot_tokens": len(ps), "source_tokens": len(ss), "fusionlab_s": round(ours_s, 5),
                     "reference_s": round(ref_s, 3), "fusionlab_samples_per_s": round(1 / ours_s, 1),
                     "reference_samples_per_s": round(1 / ref_s, 4), "speedup": round(ref_s / ours_s, 1),
                     "exact_rate": round(float(ours.exact.mean()), 4), "same_alignment_as_reference": round(float(same), 4)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version()}))


if __name__ == "__main__":
    main()
