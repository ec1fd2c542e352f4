"""Derive same-architecture checkpoints to merge, and score models by perplexity.

Only one checkpoint of each architecture ships with fusionlab (SmolLM2-135M-Instruct), so the
merge experiments make their own family from it:

- :func:`finetune`: a few AdamW steps of plain causal-LM training on a list of texts (a real,
  short fine-tune; ~10-40 s on 2 CPU cores for SmolLM2-135M), cached under
  ``$FUSIONLAB_CACHE/merge_fixtures/<key>`` where the key hashes every input;
- :func:`perturb`: base + Gaussian noise scaled per tensor (a documented stand-in for fine-tunes,
  used by the benchmark where only the tensors' shapes and values matter).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from fusionlab.io import atomic_dir, read_jsonl

log = logging.getLogger(__name__)

FIXTURE_VERSION = "2"  # 2: texts from the data shipped inside the package
CHAT_DATA = Path(__file__).resolve().parent.parent / "data" / "chat" / "fusechat_mini.jsonl"  # 64 conversations
KINDS = ("chat", "addsub", "e2e", "gsm8k")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([FIXTURE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_texts(kind: str, start: int = 0, stop: int | None = None, path: str | Path | None = None) -> list[str]:
    """Plain training/eval texts, rows ``[start, stop)``: ``chat`` (question + answer of the shipped
    conversations, ``fusionlab/data/chat/fusechat_mini.jsonl``), or a shipped task (``addsub``, ``e2e``,
    ``gsm8k``; :func:`fusionlab.tasks.load_examples`). ``path``: a user JSONL of the same format instead."""
    from fusionlab.errors import FusionlabError
    from fusionlab.tasks import load_examples

    if kind not in KINDS:
        raise FusionlabError(f"Unknown text kind {kind!r}; use one of {list(KINDS)}.")
    if path is not None and not Path(path).expanduser().is_file():
        raise FusionlabError(f"Text file {str(path)!r} (kind {kind!r}) does not exist; drop `data` to use the shipped set.")
    if kind == "chat":
        rows = read_jsonl(Path(path).expanduser() if path else CHAT_DATA)
        texts = []
        for r in rows:
            turns = r.get("conversations") or [{"value": m["content"]} for m in r.get("messages", [])]
            texts.append(f"Question: {turns[0]['value']}\nAnswer: {turns[1]['value']}")
    else:
        rows = load_examples(kind, path=str(path) if path else None)
        if kind == "addsub":
            texts = [f"Question: {r['question']}\nAnswer: {r['equation']} so the answer is {r['answer']}." for r in rows]
        elif kind == "e2e":
            texts = [f"Data: {r['question']}\nText: {r['answer'][0]}" for r in rows]
        else:  # gsm8k: the worked solution
            texts = [f"Question: {r['question']}\nAnswer: {r['solution']}" for r in rows]
    out = texts[start:stop]
    if not out:
        raise FusionlabError(f"Rows [{start}, {stop}) of the {kind!r} texts are empty ({len(texts)} rows); "
                             "pick start/stop inside the set.")
    return out


def finetune(base_dir: str | Path, texts: list[str], out_dir: str | Path, steps: int = 8, lr: float = 1e-4,
             batch_size: int = 4, max_length: int = 128, seed: int = 0) -> Path:
    """A short real fine-tune (AdamW, causal LM on ``texts``); written atomically with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
    log.info("fine-tuned %s for %d steps: loss %s", base_dir, steps, losses)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps({"base": str(base_dir), "steps": steps, "lr": lr,
                                                      "batch_size": batch_size, "max_length": max_length,
                                                      "seed": seed, "losses": losses}, indent=2))
    return out_dir


def cached_finetune(base_dir: str | Path, kind: str, cache_root: Path, start: int = 0, stop: int | None = None,
                    data: str | Path | None = None, **kw: Any) -> Path:
    """:func:`finetune` on ``load_texts(kind, start, stop, data)``, cached by a hash of all inputs (texts included)."""
    texts = load_texts(kind, start, stop, data)
    key = _key(str(base_dir), kind, hashlib.sha256("\x00".join(texts).encode()).hexdigest(), kw)
    out = cache_root / "merge_fixtures" / f"{kind}-{key}"
    return finetune(base_dir, texts, out, **kw)


def perturb(base_dir: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 0) -> Path:
    """base + N(0, (scale·std(tensor))²) per floating tensor; config and tokenizer copied."""
    from fusionlab.merge.io import CheckpointReader, ShardWriter, copy_aux_files

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    r = CheckpointReader(base_dir)
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        w = ShardWriter(tmp)
        for name in r.names:
            t = r.get(name)
            std = float(t.std()) if t.numel() > 1 else 1.0
            w.add(name, t + torch.randn(t.shape, generator=g) * scale * (std or 1.0))
        w.finish()
        copy_aux_files(r.dir, tmp)
    return out_dir


@torch.no_grad()
def perplexity(model_dir: str | Path, texts: list[str] | dict[str, list[str]], max_length: int = 256,
               batch_size: int = 4) -> float | dict[str, float]:
    """exp(mean token NLL) of a checkpoint over ``texts`` (padding excluded); a dict of text sets gives one each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sets = texts if isinstance(texts, dict) else {"": texts}
    out = {}
    for name, items in sets.items():
        nll, count = 0.0, 0
        for i in range(0, len(items), batch_size):
            enc = tok(items[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            logits = model(**enc).logits[:, :-1].float()
            labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += float(loss)
            count += int((labels != -100).sum())
        out[name] = math.exp(nll / max(count, 1))
    return out if isinstance(texts, dict) else out[""]
