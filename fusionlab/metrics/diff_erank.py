"""Diff-eRank (Wei et al., NeurIPS 2024): how much redundancy a model removes from its representations.

For one text, R (N tokens x d) holds a model's hidden states. Center R over tokens, scale every
row to unit length (Z), and take the eigenvalues of the covariance Z^T Z / N normalised to sum 1:
the matrix entropy is H = -sum p log p and the effective rank eRank = exp(H).
Diff-eRank = eRank(untrained twin) - eRank(trained), the twin being the same architecture
initialised at random with a fixed seed.

Why this is fast and exact where the reference is slow: Z^T Z (d x d) and Z Z^T (N x N) have the
same non-zero eigenvalues, so the smaller one is used, with ``eigvalsh`` (symmetric) in float64
instead of an SVD of the d x d matrix in float32. Padding never enters: padded rows are zeroed
after centering, which only adds exact zero eigenvalues (0 log 0 = 0). NaN representations are an
error, never a silent 0 as in the reference's ``nansum``.

Dataset level, two averages over texts: ``geometric`` = exp(mean H), what the reference reports,
and ``arithmetic`` = mean of the per-text eRanks.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

DEFAULT_TEXTS = Path(__file__).resolve().parent.parent / "data" / "erank_texts.jsonl"
AVERAGES = ("geometric", "arithmetic")


@dataclass
class DiffERankSettings:
    """Options of a Diff-eRank evaluation (mirror of ``conf/metric/diff_erank.yaml``)."""

    layers: Any = "last"  # "last" | "all" | list of hidden_states indices (0 = embeddings, -1 = last)
    batch_size: int = 8
    max_length: int = 512  # tokens per text; longer texts are truncated
    average: str = "geometric"  # headline dataset average: geometric (reference) | arithmetic
    seed: int = 0  # seed of the untrained twin
    texts: str | None = None  # JSONL file of texts; None = the set shipped with fusionlab
    text_field: str = "text"
    limit: int | None = None  # use only the first `limit` texts
    add_special_tokens: bool = True  # as the reference: tokenizer(text) adds BOS where the model has one

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DiffERankSettings":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise FusionlabError(f"Unknown Diff-eRank option(s) {sorted(unknown)}; valid options are "
                                 f"{sorted(cls.__dataclass_fields__)}.")
        settings = cls(**d)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.average not in AVERAGES:
            raise FusionlabError(f"Unknown Diff-eRank average {self.average!r}; use one of {AVERAGES}.")
        if int(self.batch_size) < 1:
            raise FusionlabError(f"Diff-eRank batch_size must be >= 1, got {self.batch_size!r}.")
        if self.max_length < 2:
            raise FusionlabError(f"Diff-eRank max_length must be >= 2 (eRank needs 2 tokens), got {self.max_length}.")
        if self.limit is not None and int(self.limit) < 1:
            raise FusionlabError(f"Diff-eRank limit must be >= 1 or null, got {self.limit!r}.")
        if isinstance(self.layers, str) and self.layers not in ("last", "all"):
            raise FusionlabError(f"Diff-eRank layers={self.layers!r}: use 'last', 'all' or a list of layer indices.")


def untrained_entropies(config, token_ids, layers, settings: "DiffERankSettings", pad_id: int, dtype: torch.dtype,
                        device: torch.device, desc: str = "eRank untrained") -> list:
    """Entropies of the untrained twin of ``config`` (seed ``settings.seed``) at ``layers``; the twin is
    freed before returning."""
    twin = untrained_twin(config, settings.seed, dtype=dtype, device=device)
    _, untrained = model_entropies(twin, token_ids, layers, settings.batch_size, pad_id, desc=desc)
    del twin
    _free(device, 0)
    return untrained


# --------------------------------------------------------------------------------------------
# The math: entropies of token-representation matrices
# --------------------------------------------------------------------------------------------

def _eigvalsh(sym: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh``, single-threaded on CPU.

    LAPACK's threaded symmetric eigensolver is pathological on small, shared CPUs: measured on
    2 busy cores, a 200x200 float64 matrix took 2.6 s with 2 threads and 2.6 ms with 1.
    """
    if sym.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigvalsh(sym)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(sym)
    finally:
        torch.set_num_threads(threads)


def batched_entropy(hidden: torch.Tensor, mask: torch.Tensor | None = None, center: bool = True) -> torch.Tensor:
    """Matrix entropy H of each text in a padded batch ``hidden`` (B, T, d); ``mask`` (B, T) marks real tokens.

    Returns a float64 tensor (B,). eRank = exp(H). Values at padded positions are never read
    (they may be anything, NaN included). ``center=False`` skips the centering over tokens
    (Diff-eRank always centers; the switch exists for analysis and tests).
    """
    if hidden.dim() != 3:
        raise FusionlabError("batched_entropy expects hidden states of shape (batch, tokens, dim), "
                             f"got {tuple(hidden.shape)}.")
    b, t, d = hidden.shape
    mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if mask is None else mask.to(hidden.device).bool()
    n = mask.sum(1)
    if bool((n < 2).any()):
        bad = (n < 2).nonzero().flatten().tolist()
        raise FusionlabError(f"eRank needs at least 2 tokens per text; text(s) {bad} of the batch have fewer.")
    m = mask.unsqueeze(-1)
    h = torch.where(m, hidden.to(torch.float64), 0.0)
    finite = torch.isfinite(h).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise FusionlabError(
            f"The representations of text(s) {bad} of the batch contain NaN or inf, so their eRank is undefined "
            "(the reference silently counts them as 0). The model overflowed or its weights are broken: "
            "run it in float32 (model.dtype=float32) or check the checkpoint.")
    if center:
        mean = h.sum(1, keepdim=True) / n.view(b, 1, 1)
        h = torch.where(m, h - mean, 0.0)
    z = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # zero rows stay zero
    # Same non-zero eigenvalues either way: take the smaller matrix.
    gram = z @ z.transpose(1, 2) if t <= d else z.transpose(1, 2) @ z
    lam = _eigvalsh(gram)
    # Eigenvalues below the solver's round-off (size * eps * largest) are zeros that came out as
    # +-1e-16: clamp them, so padding (extra exact zeros) cannot change H even in the last digits.
    noise = lam.shape[-1] * torch.finfo(torch.float64).eps * lam[..., -1:].abs()
    lam = torch.where(lam > noise, lam, 0.0)
    total = lam.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        bad = (total.flatten() <= 0).nonzero().flatten().tolist()
        raise FusionlabError(
            f"All token representations of text(s) {bad} of the batch are identical, so their eRank is undefined "
            "(a text repeating one token can do this); remove such texts from the text set.")
    p = lam / total
    return -torch.special.xlogy(p, p).sum(-1)


def matrix_entropy(rep: torch.Tensor, center: bool = True) -> float:
    """Matrix entropy H of one representation matrix ``rep`` (N tokens x d)."""
    if rep.dim() != 2:
        raise FusionlabError(f"matrix_entropy expects a (tokens, dim) matrix, got shape {tuple(rep.shape)}.")
    return float(batched_entropy(rep.unsqueeze(0), center=center)[0])


def erank(rep: torch.Tensor, center: bool = True) -> float:
    """Effective rank exp(H) of one representation matrix ``rep`` (N tokens x d)."""
    return math.exp(matrix_entropy(rep, center=center))


def dataset_eranks(entropies: torch.Tensor) -> tuple[float, float]:
    """(geometric, arithmetic) dataset eRank from per-text entropies: exp(mean H) and mean exp(H)."""
    e = entropies.to(torch.float64)
    return math.exp(float(e.mean())), float(e.exp().mean())


# --------------------------------------------------------------------------------------------
# Texts and models
# --------------------------------------------------------------------------------------------

def load_texts(path: str | Path | None = None, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts of a JSONL file (one object per line, text under ``field``); None = the shipped set."""
    path = Path(path).expanduser() if path else DEFAULT_TEXTS
    if not path.is_file():
        raise FusionlabError(f"Diff-eRank text file {str(path)!r} does not exist; set metric.texts to a JSONL file.")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row:
                raise FusionlabError(f"Line {lineno} of {str(path)!r} has no field {field!r} (it has {sorted(row)}); "
                                     "set metric.text_field.")
            texts.append(str(row[field]))
    if limit is not None:
        texts = texts[: int(limit)]
    if not texts:
        raise FusionlabError(f"The Diff-eRank text set {str(path)!r} is empty; give it at least one text of 2+ tokens.")
    return texts


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 512,
             add_special_tokens: bool = True) -> tuple[list[list[int]], int]:
    """Token ids of the texts with at least 2 tokens, and how many were skipped for having fewer."""
    if not texts:
        raise FusionlabError("The Diff-eRank text set is empty; give it at least one text of 2+ tokens.")
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)
    ids = [list(x) for x in enc["input_ids"]]
    kept = [x for x in ids if len(x) >= 2]
    skipped = len(ids) - len(kept)
    if skipped:
        log.warning("Diff-eRank: skipped %d of %d texts with fewer than 2 tokens.", skipped, len(ids))
    if not kept:
        raise FusionlabError(f"All {len(ids)} Diff-eRank texts have fewer than 2 tokens; eRank needs longer texts.")
    return kept, skipped


def _layer_indices(layers: Any, n_states: int) -> list[int]:
    """Normalise a layer selection to indices into ``hidden_states`` (0 = embeddings, n_states-1 = last)."""
    if layers == "last":
        return [n_states - 1]
    if layers == "all":
        return list(range(n_states))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        i = int(layer)
        if not -n_states <= i < n_states:
            raise FusionlabError(f"Diff-eRank layer {layer} does not exist: this model has hidden states "
                                 f"0..{n_states - 1} (0 = embeddings, -1 = last); fix metric.layers.")
        out.append(i % n_states)
    return out


def _hidden_states(model, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of one batch; skips the LM head (a 262k-vocab head would dominate memory)."""
    body = getattr(model, "base_model", None)
    body = body if isinstance(body, torch.nn.Module) and body is not model else model
    try:
        out = body(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
    except TypeError as e:
        raise FusionlabError(f"Model {type(model).__name__} does not return hidden states "
                             f"(forward(output_hidden_states=True) failed: {e}); "
                             "Diff-eRank needs a transformers model.") from e
    hs = getattr(out, "hidden_states", None)
    if hs is None and isinstance(out, dict):
        hs = out.get("hidden_states")
    if not hs:
        raise FusionlabError(f"Model {type(model).__name__} returned no hidden states with output_hidden_states=True; "
                             "Diff-eRank needs a model that exposes its hidden states.")
    return tuple(hs)


@torch.no_grad()
def model_entropies(model, token_ids: Sequence[Sequence[int]], layers: Any = "last", batch_size: int = 8,
                    pad_id: int = 0, desc: str = "eRank") -> tuple[list[int], torch.Tensor]:
    """Per-text matrix entropies of a model's hidden states: (layer indices, tensor (n_layers, n_texts)).

    Texts are batched by length with right padding and an attention mask, so every real token
    sees exactly what it would see alone, and padded positions never enter the statistics.
    """
    from tqdm.auto import tqdm

    if not token_ids:
        raise FusionlabError("The Diff-eRank text set is empty; give it at least one text of 2+ tokens.")
    short = [i for i, x in enumerate(token_ids) if len(x) < 2]
    if short:
        raise FusionlabError(f"Texts {short[:10]} have fewer than 2 tokens; drop them first (see tokenize()).")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    layer_ids: list[int] | None = None
    result: torch.Tensor | None = None
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, disable=None, leave=False):
            idx = order[start:start + batch_size]
            t = max(len(token_ids[i]) for i in idx)
            ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.bool)
            for row, i in enumerate(idx):
                ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[row, :len(token_ids[i])] = True
            hs = _hidden_states(model, ids.to(device), mask.to(device))
            if layer_ids is None:
                layer_ids = _layer_indices(layers, len(hs))
                result = torch.empty(len(layer_ids), len(token_ids), dtype=torch.float64)
            for k, layer in enumerate(layer_ids):
                try:
                    h = batched_entropy(hs[layer], mask.to(device))
                except FusionlabError as e:
                    raise FusionlabError(f"Diff-eRank of {type(model).__name__}, hidden state {layer}, texts "
                                         f"{idx} of the text set (in batch order): {e}") from None
                result[k, idx] = h.cpu()
    finally:
        model.train(was_training)
    return layer_ids, result


def untrained_twin(config, seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The model of ``config`` freshly initialised with ``seed``: the reference point of Diff-eRank."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def _free(device: torch.device, n_params: int) -> None:
    """Return a deleted model's memory now (a full gc pass costs seconds: only for big models)."""
    if n_params > 10_000_000:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Results and the end-to-end evaluation of one model
# --------------------------------------------------------------------------------------------

@dataclass
class DiffERankResult:
    """Per-text entropies of a trained model and its untrained twin at the selected layers."""

    layers: list[int]  # hidden_states indices (0 = embeddings; the last one is the final hidden state)
    trained: torch.Tensor  # (n_layers, n_texts) float64 entropies
    untrained: torch.Tensor  # (n_layers, n_texts)
    n_skipped: int = 0

    @property
    def n_texts(self) -> int:
        return int(self.trained.shape[1])

    def layer_summary(self, k: int = -1) -> dict[str, float]:
        """eRanks and Diff-eRank at the k-th selected layer, both dataset averages."""
        tg, ta = dataset_eranks(self.trained[k])
        ug, ua = dataset_eranks(self.untrained[k])
        return {"erank_trained_geo": tg, "erank_untrained_geo": ug, "diff_erank_geo": ug - tg,
                "erank_trained_arith": ta, "erank_untrained_arith": ua, "diff_erank_arith": ua - ta}

    def metrics(self, prefix: str = "", average: str = "geometric") -> dict[str, float | int]:
        """Flat metrics of the last selected layer; the unsuffixed keys use ``average``."""
        s = self.layer_summary(-1)
        suffix = "geo" if average == "geometric" else "arith"
        head = {k: s[f"{k}_{suffix}"] for k in ("erank_trained", "erank_untrained", "diff_erank")}
        out = {**head, **s, "layer": self.layers[-1], "n_texts": self.n_texts, "n_skipped": self.n_skipped}
        return {f"{prefix}{k}": v for k, v in out.items()}

    def layer_rows(self, model_name: str = "model") -> list[dict[str, Any]]:
        return [{"model": model_name, "layer": layer, **self.layer_summary(k)} for k, layer in enumerate(self.layers)]


def evaluate_diff_erank(spec, texts: Sequence[str], settings: DiffERankSettings | None = None) -> DiffERankResult:
    """Diff-eRank of the model of ``spec`` (a ModelSpec or dict) on ``texts``.

    The trained model runs first and is freed before its untrained twin is built, so two
    large models never sit in memory together.
    """
    from fusionlab.models import ModelSpec, load_model

    settings = settings or DiffERankSettings()
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(dict(spec))
    model, tokenizer = load_model(spec)
    token_ids, skipped = tokenize(tokenizer, texts, settings.max_length, settings.add_special_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layers, trained = model_entropies(model, token_ids, settings.layers, settings.batch_size, pad_id,
                                      desc=f"eRank {spec.name}")
    config, dtype = model.config, next(model.parameters()).dtype
    device = next(model.parameters()).device
    n_params = sum(p.numel() for p in model.parameters())
    del model
    _free(device, n_params)
    untrained = untrained_entropies(config, token_ids, layers, settings, pad_id, dtype, device,
                                    desc=f"eRank {spec.name} (untrained)")
    return DiffERankResult(layers=layers, trained=trained, untrained=untrained, n_skipped=skipped)


def plot_layers(rows: list[dict[str, Any]], path: str | Path, average: str = "geometric") -> Path:
    """Per-layer eRank (trained vs untrained) and Diff-eRank, one line per model, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "geo" if average == "geometric" else "arith"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        x = [r["layer"] for r in mine]
        line, = ax1.plot(x, [r[f"erank_trained_{suffix}"] for r in mine], "o-", label=f"{name} trained")
        ax1.plot(x, [r[f"erank_untrained_{suffix}"] for r in mine], "s--", color=line.get_color(),
                 label=f"{name} untrained")
        ax2.plot(x, [r[f"diff_erank_{suffix}"] for r in mine], "o-", color=line.get_color(), label=name)
    xlabel = "hidden state (0 = embeddings)"
    ax1.set(xlabel=xlabel, ylabel=f"eRank ({average} mean over texts)", title="eRank per layer")
    ax2.set(xlabel=xlabel, ylabel="eRank(untrained) - eRank(trained)", title="Diff-eRank per layer")
    ax2.axhline(0, color="grey", lw=0.5)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["AVERAGES", "DEFAULT_TEXTS", "DiffERankResult", "DiffERankSettings", "batched_entropy", "dataset_eranks",
           "erank", "evaluate_diff_erank", "load_texts", "matrix_entropy", "model_entropies", "plot_layers",
           "tokenize", "untrained_twin"]
