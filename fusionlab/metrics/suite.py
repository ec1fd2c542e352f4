"""The representation-metrics suite: any selection of metrics, every layer, from ONE forward pass.

A metric is one entry of :data:`METRICS` (mergekit-style registry): the function it computes per
text from a layer's normalised tokens and/or the function it computes from the text embeddings
of the whole set, the values it adds to each layer's row, and whether it needs the untrained twin
(Diff-eRank, a difference against the same architecture at random weights). The math lives in
:mod:`fusionlab.metrics.representation`; this module runs a model over a text set once, feeds
each selected layer of each batch to every selected metric (sharing one normalisation and one
Gram spectrum per layer and batch), and turns the per-text values into one row per layer.

Views for the invariance metrics (LiDAR, DiME, InfoNCE): Layer by Layer makes them by augmenting
the *text* (nlpaug) and running the model again per view. Here a view of a text is the mean of
its unit-scaled hidden states over a seeded random half of its tokens, so the suite still costs
one forward pass; the views of a text depend only on (seed, text index), never on the batching.
"""
from __future__ import annotations

import gc
import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fusionlab.errors import FusionlabError
from fusionlab.metrics.representation import (NORMALIZATIONS, Tokens, curvature, dataset_entropy, dataset_eranks,
                                              dime, entropy_scale, infonce, lidar, nuclear_norm, pool_tokens,
                                              prompt_entropy)

log = logging.getLogger(__name__)

AVERAGES = ("geometric", "arithmetic")
SUITE = "suite"  # metric name that selects every metric


def _default(fn: Callable, name: str) -> Any:
    """A metric function's default for ``name``: each parameter's default is written once, there."""
    return inspect.signature(fn).parameters[name].default


@dataclass
class MetricConfig:
    """The ``metric:`` config node (``conf/metric/*.yaml``): which metrics, on which texts and layers."""

    metrics: list[str] = field(default_factory=lambda: ["diff_erank"])  # names of METRICS, or "suite" for all
    layers: Any = "last"  # "last" | "all" | list of hidden_states indices (0 = embeddings, -1 = last)
    batch_size: int = 8
    max_length: int = 512  # tokens per text; longer texts are truncated
    texts: str | None = None  # JSONL file of texts; None = the set shipped with fusionlab
    text_field: str = "text"
    limit: int | None = None  # use only the first `limit` texts
    add_special_tokens: bool = True  # as the Diff-eRank reference: BOS where the tokenizer adds one
    seed: int = 0  # the untrained twin, the token views, the DiME permutations
    average: str = "geometric"  # Diff-eRank's headline average over texts: geometric (paper) | arithmetic
    alpha: float = _default(prompt_entropy, "alpha")  # order of the matrix entropies (prompt, dataset, LiDAR, DiME)
    normalization: str = "max_entropy"  # of those entropies: max_entropy = / log min(N, d) | log_n | log_d | raw
    views: int = 16  # token views per text for LiDAR; DiME and InfoNCE use the first 2
    lidar_delta: float = _default(lidar, "delta")
    dime_permutations: int = _default(dime, "permutations")
    infonce_temperature: float = _default(infonce, "temperature")
    curvature_abs_cos: bool = _default(curvature, "abs_cos")
    nuclear_exact: bool = _default(nuclear_norm, "exact")  # also report the exact nuclear norm (Gram spectrum)

    def __post_init__(self) -> None:
        names = [self.metrics] if isinstance(self.metrics, str) else list(self.metrics or [])
        unknown = [m for m in names if m not in METRICS and m != SUITE]
        if unknown or not names:
            raise FusionlabError(f"Unknown metric(s) {unknown or names!r} in metric.metrics; use any of "
                                 f"{sorted(METRICS)} or {SUITE!r} (all of them), "
                                 "e.g. metric.metrics=[curvature,lidar].")
        self.metrics = list(dict.fromkeys(m for name in names for m in (METRICS if name == SUITE else [name])))
        self.layers = _check_layers(self.layers)
        checks = [("batch_size", self.batch_size >= 1, ">= 1"), ("max_length", self.max_length >= 2,
                   ">= 2 (every metric needs 2 tokens per text)"),
                  ("limit", self.limit is None or self.limit >= 1, ">= 1 or null"),
                  ("average", self.average in AVERAGES, f"one of {AVERAGES}"),
                  ("alpha", self.alpha > 0, "> 0 (1 = Shannon entropy, as Diff-eRank)"),
                  ("normalization", self.normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
                  ("views", self.views >= 2, ">= 2"), ("lidar_delta", self.lidar_delta > 0, "> 0"),
                  ("dime_permutations", self.dime_permutations >= 1, ">= 1"),
                  ("infonce_temperature", self.infonce_temperature > 0, "> 0")]
        for key, ok, allowed in checks:
            if not ok:
                raise FusionlabError(f"metric.{key}={getattr(self, key)!r} is not allowed; it must be {allowed}.")
        if self.texts is not None and not Path(self.texts).expanduser().is_file():
            raise FusionlabError(f"The metric text file {self.texts!r} does not exist; set metric.texts to a JSONL "
                                 "file (one object per line, text under metric.text_field) or null for the "
                                 "shipped set.")

    @property
    def twin_metrics(self) -> list[str]:
        """The selected metrics that need the untrained twin."""
        return [m for m in self.metrics if METRICS[m].twin]


def _check_layers(layers: Any) -> str | list[int]:
    if layers in ("last", "all"):
        return layers
    items = [layers] if isinstance(layers, int) else layers
    if isinstance(items, (list, tuple)) and items and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in items):
        return list(items)
    raise FusionlabError(f"metric.layers={layers!r}: use 'last', 'all', or a list of hidden-state indices "
                         "(0 = embeddings, -1 = final hidden state), e.g. metric.layers=[0,-1].")


# --------------------------------------------------------------------------------------------
# The registry: one entry per metric
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One metric of the suite: what it computes and what it adds to each layer's row."""

    name: str
    keys: tuple[str, ...]  # the values it reports per layer
    per_text: Callable[[Tokens, MetricConfig], dict[str, torch.Tensor]] | None = None
    dataset: Callable[[torch.Tensor, MetricConfig], dict[str, float]] | None = None  # (N, 1 + A, d) embeddings
    views: Callable[[MetricConfig], int] = lambda cfg: 0  # token views per text it needs (index 0 = whole text)
    summary: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, MetricConfig],
                      dict[str, float]] | None = None  # per-text values -> layer values; None = mean over texts
    twin: bool = False  # a difference against the untrained twin
    panels: tuple[tuple[str, ...], ...] = ()  # keys drawn together in its plot; () = one panel per key
    plot_file: str | None = None  # its plot's file name; None = <name>_layers.png

    @property
    def plot(self) -> str:
        return self.plot_file or f"{self.name}_layers.png"


def _scaled(h, cfg: MetricConfig, n, d: int):
    return h / entropy_scale(cfg.normalization, n, d)


def _diff_erank_summary(text: dict[str, torch.Tensor], twin: dict[str, torch.Tensor] | None,
                        cfg: MetricConfig) -> dict[str, float]:
    if twin is None:
        raise FusionlabError("Diff-eRank needs the untrained twin's entropies; evaluate it with evaluate_model().")
    tg, ta = dataset_eranks(text["entropy"])
    ug, ua = dataset_eranks(twin["entropy"])
    both = {"erank_trained_geo": tg, "erank_untrained_geo": ug, "diff_erank_geo": ug - tg,
            "erank_trained_arith": ta, "erank_untrained_arith": ua, "diff_erank_arith": ua - ta}
    suffix = "geo" if cfg.average == "geometric" else "arith"
    return {**{k: both[f"{k}_{suffix}"] for k in ("erank_trained", "erank_untrained", "diff_erank")}, **both}


def _matrix_entropy_text(t: Tokens, cfg: MetricConfig) -> dict[str, torch.Tensor]:
    return {"prompt_entropy": _scaled(prompt_entropy(t, cfg.alpha), cfg, t.n, t.dim)}


def _matrix_entropy_set(e: torch.Tensor, cfg: MetricConfig) -> dict[str, float]:
    return {"dataset_entropy": float(_scaled(dataset_entropy(e[:, 0], cfg.alpha), cfg, e.shape[0], e.shape[-1]))}


def _nuclear_text(t: Tokens, cfg: MetricConfig) -> dict[str, torch.Tensor]:
    out = {"nuclear_norm": nuclear_norm(t) / t.n}
    if cfg.nuclear_exact:
        out["nuclear_norm_exact"] = nuclear_norm(t, exact=True) / t.n
    return out


def _lidar_set(e: torch.Tensor, cfg: MetricConfig) -> dict[str, float]:
    h = lidar(e[:, 1:1 + cfg.views], cfg.alpha, cfg.lidar_delta)
    return {"lidar": float(_scaled(h, cfg, e.shape[0], e.shape[-1]))}


def _dime_set(e: torch.Tensor, cfg: MetricConfig) -> dict[str, float]:
    h = dime(e[:, 1:3], cfg.alpha, cfg.dime_permutations, cfg.seed)
    return {"dime": float(_scaled(h, cfg, e.shape[0], e.shape[-1]))}


def _infonce_set(e: torch.Tensor, cfg: MetricConfig) -> dict[str, float]:
    loss = infonce(e[:, 1:3], cfg.infonce_temperature)
    return {"infonce": loss, "infonce_mi": 1.0 - loss / math.log(e.shape[0])}


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("diff_erank", ("erank_trained", "erank_untrained", "diff_erank", "erank_trained_geo",
                          "erank_untrained_geo", "diff_erank_geo", "erank_trained_arith", "erank_untrained_arith",
                          "diff_erank_arith"),
           per_text=lambda t, cfg: {"entropy": prompt_entropy(t, 1.0)}, summary=_diff_erank_summary, twin=True,
           panels=(("erank_trained", "erank_untrained"), ("diff_erank",)), plot_file="erank_layers.png"),
    Metric("matrix_entropy", ("prompt_entropy", "dataset_entropy"), per_text=_matrix_entropy_text,
           dataset=_matrix_entropy_set),
    Metric("curvature", ("curvature",), per_text=lambda t, cfg: {"curvature": curvature(t, cfg.curvature_abs_cos)}),
    Metric("lidar", ("lidar",), dataset=_lidar_set, views=lambda cfg: cfg.views),
    Metric("dime", ("dime",), dataset=_dime_set, views=lambda cfg: 2),
    Metric("infonce", ("infonce", "infonce_mi"), dataset=_infonce_set, views=lambda cfg: 2),
    Metric("nuclear_norm", ("nuclear_norm", "nuclear_norm_exact"), per_text=_nuclear_text),
]}


# --------------------------------------------------------------------------------------------
# Texts, models and the one forward pass
# --------------------------------------------------------------------------------------------

def tokenize(tokenizer, texts: Sequence[str], max_length: int = 512,
             add_special_tokens: bool = True) -> tuple[list[list[int]], int]:
    """Token ids of the texts with at least 2 tokens, and how many were skipped for having fewer."""
    if not texts:
        raise FusionlabError("The metric text set is empty; give it at least one text of 2+ tokens.")
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)
    ids = [list(x) for x in enc["input_ids"]]
    kept = [x for x in ids if len(x) >= 2]
    skipped = len(ids) - len(kept)
    if skipped:
        log.warning("Representation metrics: skipped %d of %d texts with fewer than 2 tokens.", skipped, len(ids))
    if not kept:
        raise FusionlabError(f"All {len(ids)} metric texts have fewer than 2 tokens; every metric needs longer texts.")
    return kept, skipped


def layer_indices(layers: Any, n_states: int) -> list[int]:
    """Normalise a layer selection to indices into ``hidden_states`` (0 = embeddings, n_states-1 = last)."""
    if layers == "last":
        return [n_states - 1]
    if layers == "all":
        return list(range(n_states))
    out = []
    for layer in [layers] if isinstance(layers, int) else layers:
        if not -n_states <= int(layer) < n_states:
            raise FusionlabError(f"metric layer {layer} does not exist: this model has hidden states "
                                 f"0..{n_states - 1} (0 = embeddings, -1 = last); fix metric.layers.")
        out.append(int(layer) % n_states)
    return out


def _n_hidden_states(model) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n + 1 if isinstance(n, int) else None


def hidden_states(model, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of one batch; skips the LM head (a 262k-vocab head would dominate memory)."""
    body = getattr(model, "base_model", None)
    body = body if isinstance(body, torch.nn.Module) and body is not model else model
    try:
        out = body(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
    except TypeError as e:
        raise FusionlabError(f"Model {type(model).__name__} does not return hidden states "
                             f"(forward(output_hidden_states=True) failed: {e}); "
                             "representation metrics need a transformers model.") from e
    hs = getattr(out, "hidden_states", None)
    if hs is None and isinstance(out, dict):
        hs = out.get("hidden_states")
    if not hs:
        raise FusionlabError(f"Model {type(model).__name__} returned no hidden states with output_hidden_states=True; "
                             "representation metrics need a model that exposes its hidden states.")
    return tuple(hs)


def view_masks(token_ids: Sequence[Sequence[int]], n_views: int, seed: int) -> list[torch.Tensor]:
    """Per text, ``n_views`` seeded random halves of its tokens (n_views, n_tokens); view j of text i
    depends only on (seed, i, j), so the first views are the same whatever ``n_views`` is."""
    out = []
    for i, ids in enumerate(token_ids):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        n = len(ids)
        m = torch.zeros(n_views, n, dtype=torch.bool)
        for j in range(n_views):
            m[j, torch.randperm(n, generator=g)[:(n + 1) // 2]] = True
        out.append(m)
    return out


@dataclass
class Measurements:
    """What one pass over a text set gives, per selected layer: per-text values and dataset values."""

    layers: list[int]  # hidden_states indices (0 = embeddings; the last one is the final hidden state)
    per_text: dict[str, torch.Tensor]  # key -> (n_layers, n_texts) float64
    dataset: dict[str, torch.Tensor]  # key -> (n_layers,) float64
    embeddings: torch.Tensor | None = None  # (n_layers, n_texts, 1 + views, d) float32, with keep_embeddings

    def layer(self, k: int) -> dict[str, torch.Tensor]:
        return {key: v[k] for key, v in self.per_text.items()}

    def subset(self, texts: Sequence[int], cfg: MetricConfig, layers: Sequence[int] | None = None) -> "Measurements":
        """The measurements of a subset of the texts (and of the layers, by hidden-state index), e.g.
        for bootstrap intervals: per-text values are sliced; dataset values are recomputed from the
        kept embeddings, or dropped when there are none."""
        ks = [self.layers.index(layer) for layer in layers] if layers is not None else list(range(len(self.layers)))
        idx = torch.as_tensor(list(texts), dtype=torch.long)
        per_text = {key: v[ks][:, idx] for key, v in self.per_text.items()}
        emb = self.embeddings[ks][:, idx] if self.embeddings is not None else None
        names = [m for m in cfg.metrics if METRICS[m].dataset]
        dataset = dataset_values(emb, [self.layers[k] for k in ks], cfg, names) if emb is not None and names else {}
        return Measurements([self.layers[k] for k in ks], per_text, dataset, emb)


@torch.no_grad()
def measure(model, token_ids: Sequence[Sequence[int]], cfg: MetricConfig, pad_id: int = 0,
            metrics: Sequence[str] | None = None, desc: str = "metrics", keep_embeddings: bool = False) -> Measurements:
    """Every selected metric (``metrics`` or ``cfg.metrics``) at every selected layer, one forward pass.

    Texts are batched by length with right padding and an attention mask, so every real token sees
    exactly what it would see alone, and padded positions never enter a value.
    """
    from tqdm.auto import tqdm

    selected = [METRICS[m] for m in (metrics or cfg.metrics)]
    if not token_ids:
        raise FusionlabError("The metric text set is empty; give it at least one text of 2+ tokens.")
    short = [i for i, x in enumerate(token_ids) if len(x) < 2]
    if short:
        raise FusionlabError(f"Texts {short[:10]} have fewer than 2 tokens; drop them first (see tokenize()).")
    n_texts = len(token_ids)
    pooled = any(m.dataset for m in selected)
    n_views = max(m.views(cfg) for m in selected)
    views = view_masks(token_ids, n_views, cfg.seed) if n_views else None
    n_states = _n_hidden_states(model)
    layer_ids = layer_indices(cfg.layers, n_states) if n_states else None  # bad indices fail before any pass
    per_text: dict[str, torch.Tensor] = {}
    embeddings: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(n_texts), key=lambda i: -len(token_ids[i]))
    try:
        for start in tqdm(range(0, n_texts, cfg.batch_size), desc=desc, disable=None, leave=False):
            idx = order[start:start + cfg.batch_size]
            t = max(len(token_ids[i]) for i in idx)
            ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.bool)
            vm = torch.zeros(len(idx), n_views, t, dtype=torch.bool)
            for row, i in enumerate(idx):
                ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[row, :len(token_ids[i])] = True
                if views is not None:
                    vm[row, :, :len(token_ids[i])] = views[i]
            mask = mask.to(device)
            hs = hidden_states(model, ids.to(device), mask)
            if layer_ids is None or n_states != len(hs):
                n_states = len(hs)
                layer_ids = layer_indices(cfg.layers, n_states)
            for k, layer in enumerate(layer_ids):
                try:
                    tokens = Tokens(hs[layer], mask)
                    for metric in selected:
                        for key, value in (metric.per_text(tokens, cfg) if metric.per_text else {}).items():
                            per_text.setdefault(key, torch.full((len(layer_ids), n_texts), torch.nan,
                                                                dtype=torch.float64))[k, idx] = value.cpu()
                    if pooled:
                        e = pool_tokens(hs[layer], mask, vm.to(device) if views is not None else None)
                        if embeddings is None:
                            embeddings = torch.empty(len(layer_ids), n_texts, e.shape[1], e.shape[2])
                        embeddings[k, idx] = e.float().cpu()
                except FusionlabError as err:
                    raise FusionlabError(f"Representation metrics of {type(model).__name__}, hidden state {layer}, "
                                         f"texts {idx} of the text set (in batch order): {err}") from None
    finally:
        model.train(was_training)
    dataset = dataset_values(embeddings, layer_ids, cfg, metrics, type(model).__name__) if pooled else {}
    return Measurements(layer_ids, per_text, dataset, embeddings if keep_embeddings else None)


def dataset_values(embeddings: torch.Tensor, layers: list[int], cfg: MetricConfig,
                   metrics: Sequence[str] | None = None, model_name: str = "the model") -> dict[str, torch.Tensor]:
    """The dataset-level metrics of ``metrics`` (or ``cfg.metrics``) from text embeddings
    (n_layers, n_texts, 1 + views, d): key -> (n_layers,)."""
    out: dict[str, torch.Tensor] = {}
    for metric in (METRICS[m] for m in (metrics or cfg.metrics) if METRICS[m].dataset):
        for k, layer in enumerate(layers):
            try:
                values = metric.dataset(embeddings[k].double(), cfg)
            except FusionlabError as err:
                raise FusionlabError(f"{metric.name} of {model_name}, hidden state {layer}: {err}") from None
            for key, value in values.items():
                out.setdefault(key, torch.empty(len(layers), dtype=torch.float64))[k] = value
    return out


def summarize(trained: Measurements, twin: Measurements | None, cfg: MetricConfig,
              metrics: Sequence[str] | None = None) -> list[dict[str, float]]:
    """One row of values per layer: each metric's summary of its per-text values, and its dataset values."""
    rows = []
    for k in range(len(trained.layers)):
        text, row = trained.layer(k), {}
        for metric in (METRICS[m] for m in (metrics or cfg.metrics)):
            if metric.summary:
                row.update(metric.summary(text, twin.layer(k) if twin else None, cfg))
            else:
                row.update({key: float(torch.nanmean(text[key])) for key in metric.keys if key in text})
            row.update({key: float(trained.dataset[key][k]) for key in metric.keys if key in trained.dataset})
        rows.append(row)
    return rows


def untrained_twin(config, seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The model of ``config`` freshly initialised with ``seed``: the reference point of Diff-eRank."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def measure_twin(config, token_ids: Sequence[Sequence[int]], cfg: MetricConfig, pad_id: int = 0,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 desc: str = "metrics (untrained twin)") -> Measurements:
    """The twin-needing metrics of ``cfg`` on the untrained twin of ``config`` (seed ``cfg.seed``),
    freed before returning."""
    twin = untrained_twin(config, cfg.seed, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in twin.parameters())
    result = measure(twin, token_ids, cfg, pad_id, metrics=cfg.twin_metrics, desc=desc)
    del twin
    free_memory(torch.device(device), n_params)
    return result


def free_memory(device: torch.device, n_params: int) -> None:
    """Return a deleted model's memory now (a full gc pass costs seconds: only for big models)."""
    if n_params > 10_000_000:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Results and the end-to-end evaluation of one model
# --------------------------------------------------------------------------------------------

@dataclass
class MetricsResult:
    """The suite's values for one model: a row per layer, and the measurements they come from."""

    metrics: list[str]
    trained: Measurements
    twin: Measurements | None
    table: list[dict[str, float]]  # one row per selected layer
    n_texts: int
    n_skipped: int = 0

    @property
    def layers(self) -> list[int]:
        return self.trained.layers

    def rows(self, model_name: str = "model") -> list[dict[str, Any]]:
        return [{"model": model_name, "layer": layer, **row} for layer, row in zip(self.layers, self.table)]

    def flat(self, prefix: str = "") -> dict[str, float | int]:
        """Flat metrics: each value at the last selected layer as ``<prefix><key>``, every layer as
        ``<prefix>layer<i>/<key>``, and ``layer``, ``n_texts``, ``n_skipped``."""
        out: dict[str, float | int] = dict(self.table[-1])
        if len(self.layers) > 1:
            for layer, row in zip(self.layers, self.table):
                out.update({f"layer{layer}/{k}": v for k, v in row.items()})
        out.update(layer=self.layers[-1], n_texts=self.n_texts, n_skipped=self.n_skipped)
        return {f"{prefix}{k}": v for k, v in out.items()}


def evaluate_model(spec, texts: Sequence[str], cfg: MetricConfig | None = None,
                   keep_embeddings: bool = False) -> MetricsResult:
    """The selected metrics of the model of ``spec`` (a ModelSpec or a dict of its fields) on ``texts``.

    The tokenizer loads first, so texts too short for any metric fail before the model loads. The
    trained model runs first and is freed before its untrained twin is built (when a metric needs
    it), so two large models never sit in memory together.
    """
    from fusionlab.models import ModelSpec, load_model, load_tokenizer

    cfg = cfg or MetricConfig()
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**dict(spec))
    tokenizer = load_tokenizer(spec)
    token_ids, skipped = tokenize(tokenizer, texts, cfg.max_length, cfg.add_special_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model, _ = load_model(spec)
    trained = measure(model, token_ids, cfg, pad_id, desc=f"metrics {spec.name}", keep_embeddings=keep_embeddings)
    twin = None
    if cfg.twin_metrics:
        config, dtype, device = model.config, next(model.parameters()).dtype, next(model.parameters()).device
        n_params = sum(p.numel() for p in model.parameters())
        del model  # no reference to a parameter may survive this, or its memory stays taken
        free_memory(device, n_params)
        twin = measure_twin(config, token_ids, cfg, pad_id, dtype, device, desc=f"metrics {spec.name} (untrained)")
    return MetricsResult(cfg.metrics, trained, twin, summarize(trained, twin, cfg), len(token_ids), skipped)


def plot_metrics(rows: list[dict[str, Any]], metrics: Sequence[str], output_dir: str | Path) -> list[Path]:
    """One PNG per metric (``<metric>_layers.png``): its values against the layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusionlab.io import atomic_path

    paths = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for metric in (METRICS[m] for m in metrics):
        panels = [tuple(k for k in p if any(k in r for r in rows))
                  for p in (metric.panels or tuple((k,) for k in metric.keys if not k.endswith(("_geo", "_arith"))))]
        panels = [p for p in panels if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, keys in zip(axes[0], panels):
            for color, name in enumerate(models):
                mine = [r for r in rows if r["model"] == name]
                for style, key in zip(("o-", "s--", "^:"), keys):
                    ax.plot([r["layer"] for r in mine], [r[key] for r in mine], style, color=f"C{color}",
                            label=f"{name} {key}" if len(keys) > 1 else name)
            ax.set(xlabel="hidden state (0 = embeddings)", ylabel=" / ".join(keys), title=" vs ".join(keys))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(metric.name)
        fig.tight_layout()
        path = Path(output_dir) / metric.plot
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["AVERAGES", "METRICS", "Measurements", "Metric", "MetricConfig", "MetricsResult", "dataset_values",
           "evaluate_model",
           "hidden_states", "layer_indices", "measure", "measure_twin", "plot_metrics", "summarize", "tokenize",
           "untrained_twin", "view_masks"]
