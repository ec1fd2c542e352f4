"""Knowledge fusion with a source that knows more than the pivot (issue 12): does fusing it beat CLM then?

The shipped pair cannot test FuseChat's claim: Gemma-3-270M predicts the held-out replies *worse* than the
pivot (source_advantage.py: +0.073 [+0.054, +0.092] nats/byte), so fused ≈ CLM is expected. This builds a
source with a real advantage from what ships and runs the unchanged fusechat_pairwise comparison with it.

Pre-registered (this docstring was committed before any of its runs; nothing is changed after a number):

- **Source** ``smol_more``: SmolLM2-135M-Instruct fine-tuned (``fusionlab.merge.derive``: AdamW, plain CLM)
  on the 180 training-pool conversations fusechat_pairwise does *not* train on — rows [192, 372) of the
  pool left by the seeded held-out (64) / dev (64) split — rendered with the pivot's chat template, 180 steps
  × batch 2, lr 1e-4, 256 tokens. Disjoint from the held-out, dev and fused / CLM training conversations, so
  what it knows beyond the pivot comes from other data, as a FuseChat source's does.
- **Step 1, dev** (``dev``): its nats/byte advantage over the pivot on the *dev* slice
  (source_advantage.py). If the interval of source − pivot does not lie below 0, stop and report that.
- **Step 2, held-out** (``run``): one run of ``+experiment=fusechat_pairwise`` with only the source changed
  (λ 0.9, lr 5e-5, 48 steps × 4 conversations, 128 tokens: the shipped settings, not tuned): held-out
  fused − CLM cross-entropy with its paired interval. Fusion "works here" iff that interval lies below 0.
  Also reported (not a criterion): the source's held-out advantage, AddSub accuracy.

Attempt 1 (2026-12-04 06:24–06:41 UTC; 180 steps × 2, lr 1e-4): dev source − pivot **−0.0071 [−0.0194,
+0.0052]** nats/byte (source better on 56% of the 64 dev conversations; pivot 0.358, source 0.351): the
interval does not lie below 0, so by the rule above it stopped there, its held-out run not made.
Attempt 2 (pre-registered here, committed before it ran, same rule, same dev gate): a stronger fine-tune of
the same data — twice the steps at twice the learning rate (``--attempt 2``: 360 steps × 2, lr 2e-4).
Result (06:41–06:53 UTC): it memorised its 180 conversations (train loss 2.5 → 0.10–0.28) and predicts the
dev replies *worse* than the pivot: source − pivot **+0.0926 [+0.0722, +0.1133]** nats/byte (better on 12%):
gate failed again; stopped, no held-out run, no third attempt (more attempts would be a search on dev
with the held-out test still to come; a design for the next one is in docs/distill.md).
Attempt 3 (pre-registered here 2026-12-04 20:51 UTC, commit 527cff0, before it ran; the design docs/distill.md
named as "what we would run next"): the source is made with the recipe that measurably generalises — the CLM
twin's own: the distill job at λ = 1 (assistant tokens only, AdamW lr 5e-5, 3% warm-up + cosine, 48 steps ×
4 conversations, 128 tokens, seed 0: every fusechat_pairwise setting) on the same disjoint rows [192, 372)
(``distill.data.start=192 distill.data.limit=180``), its trained pivot exported as the source (``--attempt 3``).
Same dev gate, same held-out run, same criterion; if the gate fails, stop: no fourth attempt. (This goes
back on "no third attempt" above, openly: attempt 3 changes no knob of attempts 1–2 to pass the gate, it
runs the one design written down after them; the held-out set stays unseen by every attempt.)
Result (20:51–21:38 UTC, loaded box): dev gate source − pivot **−0.0327 [−0.0389, −0.0264]** nats/byte (better on
94%): passed. Held-out run (one, unchanged settings): fused − CLM **−0.0028 [−0.0047, −0.0010]** nats/token
(fused 1.5623, CLM twin 1.5651, pivot 1.7059): the interval lies below 0, so by the rule fusion works here — a
small effect (2% of what fine-tuning gains over the pivot). Reported, not a criterion: the source's held-out
advantage −0.0290 [−0.0354, −0.0233] nats/byte; AddSub-eq 0.125 for both (0.000 [0.000, 0.000]). The source
shares the pivot's tokenizer (exact alignment on 100% of positions), so this tests the fusion objective, not
the cross-vocabulary alignment. (The run that made the source scored its own held-out CE as every distill run
does, 1.5701; nothing was chosen on it.)

    PYTHONPATH=. python experiments/distill/advantaged_source.py prepare   # the source's data + fine-tune (cached)
    PYTHONPATH=. python experiments/distill/advantaged_source.py dev       # step 1
    PYTHONPATH=. python experiments/distill/advantaged_source.py run       # step 2 (a fusionlab.run job)
    (each with --attempt 1 | 2 | 3; attempt 3's source is a fusionlab.run distill job, cached in --work)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOL_ROWS = (192, 372)  # of the training pool after the held-out/dev split; fusechat_pairwise trains on [0, 192)
SOURCE_FITS = {1: {"steps": 180, "batch_size": 2, "lr": 1e-4, "max_length": 256, "seed": 0},
               2: {"steps": 360, "batch_size": 2, "lr": 2e-4, "max_length": 256, "seed": 0}}
SOURCE_FIT = SOURCE_FITS[1]  # set from --attempt
# Attempt 3: the CLM twin's recipe (fusechat_pairwise at λ = 1) on the source's rows, as a distill job.
TWIN_RECIPE = ["+experiment=fusechat_pairwise", "distill.lam=1.0", f"distill.data.start={POOL_ROWS[0]}",
               f"distill.data.limit={POOL_ROWS[1] - POOL_ROWS[0]}", "distill.baseline=null", "distill.eval.task=null"]
PIVOT = "smollm2_135m"


def source_texts(work: Path) -> Path:
    """The source's training conversations, rendered with the pivot's chat template, as a {text} JSONL."""
    from fusionlab.distill.config import DataConfig
    from fusionlab.distill.conversations import load_conversations, render, split_conversations
    from fusionlab.models import ModelSpec, load_tokenizer

    dc = DataConfig(dev_size=64)  # fusechat_pairwise's split
    pool, heldout, dev = split_conversations(load_conversations(dc.path), dc.heldout, dc.heldout_seed, dc.dev_size)
    rows = pool[POOL_ROWS[0]:POOL_ROWS[1]]
    assert len(rows) == POOL_ROWS[1] - POOL_ROWS[0], len(rows)
    taken = {c["id"] for c in pool[:POOL_ROWS[0]] + heldout + dev}
    assert not taken & {c["id"] for c in rows}, "the source's data overlaps the fused/held-out/dev conversations"
    tok = load_tokenizer(ModelSpec(name=PIVOT, source="embedded", path=PIVOT))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "source_conversations.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for c in rows:
            f.write(json.dumps({"id": c["id"], "text": render(tok, c["messages"])[0]}, ensure_ascii=False) + "\n")
    return path


def derive_spec(data: Path) -> dict:
    return {"kind": "erank", "data": str(data), **SOURCE_FIT}  # erank: the {text} format of a user JSONL


def prepare_twin_recipe(work: Path) -> str:
    """Attempt 3's source: the distill job at λ = 1 on rows [192, 372); its exported model dir."""
    run_dir = work / "attempt3_source"
    model = run_dir / "model"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "fusionlab.run", *TWIN_RECIPE, f"hydra.run.dir={run_dir}"], check=True)
    print(f"source checkpoint: {model}")
    return str(model)


def prepare(work: Path, attempt: int) -> str:
    from fusionlab.merge.derive import DeriveSpec, derive_models

    if attempt == 3:
        return prepare_twin_recipe(work)
    data = source_texts(work)
    out = derive_models({"smol_more": DeriveSpec(**derive_spec(data))}, PIVOT)["smol_more"]
    print(f"source conversations: {data}\nsource checkpoint: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "dev", "heldout_advantage", "run"])
    ap.add_argument("--work", default="/tmp/advantaged_source")
    ap.add_argument("--run-dir", default="/tmp/advantaged_source/run")
    ap.add_argument("--attempt", type=int, choices=[*sorted(SOURCE_FITS), 3], default=3)
    args = ap.parse_args()
    SOURCE_FIT.clear()
    SOURCE_FIT.update(SOURCE_FITS.get(args.attempt, {}))
    work = Path(args.work)
    if args.step == "prepare":
        prepare(work, args.attempt)
        return
    if args.step in ("dev", "heldout_advantage"):
        source = prepare(work, args.attempt)
        split = "dev" if args.step == "dev" else "heldout"
        subprocess.run([sys.executable, str(HERE / "source_advantage.py"), "--split", split, "--source", source],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return
    if args.attempt == 3:
        source = [f"distill.sources.smol_more.path={prepare(work, 3)}"]
    else:
        data = source_texts(work)
        spec = ",".join(f"{k}:{json.dumps(v)}" for k, v in derive_spec(data).items())
        source = ["distill.sources.smol_more.path=derived:smol_more", f"+distill.derive.smol_more={{{spec}}}"]
    # a model node is added from the model group (OmegaConf refuses a {...} dict for a typed ModelSpec entry);
    # float32 on the CPU, as the dev gate scored it and as the pivot runs
    source = ["+model@distill.sources.smol_more=hf", "distill.sources.smol_more.name=smol_more",
              "distill.sources.smol_more.dtype=float32", "distill.sources.smol_more.device=cpu", *source]
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", "~distill.sources.gemma3_270m",
           *source, f"hydra.run.dir={args.run_dir}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
