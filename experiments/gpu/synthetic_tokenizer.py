"""Tokenizers of any vocabulary size, built offline in a second: the GPU box has no hub and no
room (64 MiB) for real 128k/32k tokenizer files, yet EVA and FuseChat need two *different*
vocabularies of realistic sizes (Llama-3's 128,256 byte-level BPE, Llama-2's 32,000 SentencePiece).

The merges are character n-grams of the shipped English texts, most frequent first (so English
text splits into 2-4 character tokens, as with a trained BPE), then seeded random pairs and
extensions until the vocabulary has exactly ``vocab_size`` entries. Two styles, as the real families:

- ``byte_level``: GPT-2 byte alphabet, ``Ġ`` for a space (Llama-3, Qwen, SmolLM2), ChatML template;
- ``sentencepiece``: ``▁`` for a space, ``<0xNN>`` byte fallback (Llama-2, Gemma), no template.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = [REPO / "fusionlab/data/chat/fusechat_mini.jsonl", REPO / "fusionlab/data/erank_texts.jsonl"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STYLES = ("byte_level", "sentencepiece")


def corpus_texts() -> list[str]:
    texts = []
    for path in CORPUS:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            turns = row.get("conversations") or row.get("messages") or []
            texts += [t.get("value", t.get("content", "")) for t in turns] or [row.get("text", "")]
    return texts


def _merges(alphabet: list[str], words: Counter, n: int, seed: int, max_len: int = 4) -> list[tuple[str, str]]:
    """``n`` BPE merges (left, right); every merge's parts exist before it (a valid BPE rank order)."""
    grams: Counter = Counter()
    known = set(alphabet)
    for w, c in words.items():
        for i in range(len(w)):
            for length in range(2, max_len + 1):
                g = w[i:i + length]
                if len(g) == length and all(ch in known for ch in g):
                    grams[g] += c
    merges, vocab = [], set(alphabet)
    for g, _ in sorted(grams.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0])):  # prefixes come first
        if len(merges) == n:
            return merges
        if g[:-1] in vocab and g not in vocab:
            merges.append((g[:-1], g[-1]))
            vocab.add(g)
    rng, tokens = random.Random(seed), sorted(vocab)
    while len(merges) < n:  # rare tokens: seeded random extensions of existing tokens
        left, right = rng.choice(tokens), rng.choice(alphabet)
        if left + right not in vocab and len(left) < 8:
            merges.append((left, right))
            vocab.add(left + right)
            tokens.append(left + right)
    return merges


def build_tokenizer(out_dir: str | Path, vocab_size: int, style: str = "byte_level", seed: int = 0) -> Path:
    """Write an HF tokenizer directory with exactly ``vocab_size`` ids (loadable by AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; use one of {STYLES}")
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    if style == "byte_level":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = list(bytes_to_unicode().values())
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        alphabet = []
    words: Counter = Counter()
    for text in corpus_texts():
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    if style == "sentencepiece":
        chars = Counter(ch for w, c in words.items() for ch in w for _ in range(c))
        alphabet = sorted(set(chars) | {"▁"}, key=lambda ch: (-chars[ch], ch))
    n_merges = vocab_size - len(specials) - len(alphabet)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(specials) + len(alphabet)} base tokens of {style}")
    merges = _merges(alphabet, words, n_merges, seed)
    tokens = specials + alphabet + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    if style == "byte_level":
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.pre_tokenizer = pre
    if style == "byte_level":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", additional_special_tokens=specials)
        fast.chat_template = CHATML
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<unk>")
    if len(fast) != vocab_size:
        raise AssertionError(f"built {len(fast)} ids, wanted {vocab_size}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
