"""Rebuild fusionlab/data/erank_texts.jsonl, the small text set shipped for Diff-eRank.

Deterministic: assistant outputs of a ShareGPT-style sample of LLaMA-Factory's alpaca_en_demo.json
(Alpaca-GPT4 style,
CC BY-NC 4.0), every 5th record whose output has 200-1200 characters, the first 40 of them.

    python experiments/metrics/make_texts.py --src PATH/sample.jsonl [--n 40]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import json

OUT = Path(__file__).resolve().parents[2] / "fusionlab" / "data" / "erank_texts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="JSONL of {id, conversations: [human, gpt]}")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    rows = []
    with open(args.src, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for i, rec in enumerate(records):
        text = rec["conversations"][1]["value"].strip()
        if i % 5 == 0 and 200 <= len(text) <= 1200:
            rows.append({"id": rec["id"], "text": text})
        if len(rows) == args.n:
            break
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} texts to {OUT}")


if __name__ == "__main__":
    main()
