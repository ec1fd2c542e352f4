"""The distillation pipeline: conversations → representations → aligned targets → fit → export, cached.

One implementation for the ``distill`` job (one fit) and the ``fusechat_merge`` job (one fit per
pairwise target). Every step that costs model time is cached on disk and keyed by what it was
made from, so a rerun, a resumed run and the extra ranks of ddp/fsdp/deepspeed (Lightning
re-launches the command for them; they find every cache complete and only read it) skip it:

- representations of each model: ``<cache>/pivot`` and ``<cache>/source-<name>-<hash>`` (resumable shards);
- the fused training set: ``<cache>/fused-<hash of mapping + sources + topk>.safetensors`` (+ stats).

The Lightning ``Trainer`` comes from the caller (a factory: jobs build it from the config's
trainer, callbacks and loggers); this module never reads a Hydra config.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fusionlab.distill.config import DistillConfig, PairwiseTarget
from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec

log = logging.getLogger(__name__)

# Part of every fused-set cache key: bump it when the alignment code changes what it writes (2: MS exact
# match first and no pivot special targets, 1-1 pairs only of the same token; issue 12).
ALIGNMENT_VERSION = 2


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_plain).encode()).hexdigest()[:12]


@dataclass
class FusedData:
    """The fused training set and the pivot it was made for (loaded once, then trained)."""

    records: list[dict[str, Any]]
    pivot_model: Any
    pivot_tokenizer: Any
    source_names: list[str]
    metrics: dict[str, Any]  # repr/*, align/*, time/*
    heldout: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # rendered texts never trained on
    split: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # {"train": ids, "heldout": ids}
    trained_model: Any = None  # set by fit(): the trained pivot (a peft model under LoRA)


def _representations(spec: ModelSpec, texts: list[dict], out_dir: Path, dc: DistillConfig, *, add_bos: bool,
                     fingerprint: str, model=None, tokenizer=None) -> dict[str, int]:
    """Extraction of one model over the texts (``done.json`` marks a complete cache: the model is not even loaded)."""
    from fusionlab.distill.representations import extract_representations
    from fusionlab.io import write_json
    from fusionlab.models import load_model

    done = out_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    if model is None:
        model, tokenizer = load_model(spec)
    stats = extract_representations(model, tokenizer, texts, out_dir, name=spec.name, topk=dc.topk,
                                    shard_size=dc.shard_size, batch_size=dc.extract_batch_size, add_bos=add_bos,
                                    max_length=4 * dc.data.max_length,  # a cap only: the text is already cut
                                    fingerprint=fingerprint)
    if stats["kept"] == 0:
        raise FusionlabError(f"Model {spec.name!r} produced no usable representations: all "
                             f"{stats['dropped_nan']} NaN and {stats['dropped_no_assistant']} without assistant "
                             "tokens; check the data and model dtype.")
    write_json(done, stats)
    return stats


def _cache_root(path: Path, where: str) -> Path:
    """The cache dir, made now, so one that cannot be (a file in the way, no permission) is named before any
    model time is spent."""
    if path.exists() and not path.is_dir():
        raise FusionlabError(f"{where}={str(path)!r} is a file, not a directory; set distill.cache_dir to a directory "
                             "(or null: $FUSIONLAB_CACHE/distill/<hash>).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FusionlabError(f"{where}={str(path)!r} cannot be created ({err.strerror or err}); set "
                             "distill.cache_dir to a writable directory (or null: $FUSIONLAB_CACHE/distill/<hash>).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FusionlabError(f"{where}={str(path)!r} is not writable; set distill.cache_dir to a writable directory "
                             "(or null: $FUSIONLAB_CACHE/distill/<hash>).")
    return path


def _check_topk(topk: int, tokenizers: dict[str, Any]) -> None:
    """top-k cannot exceed a vocabulary: torch's topk would fail mid-extraction, after the pivot's was done."""
    sizes = {who: len(tok) for who, tok in tokenizers.items()}
    smallest = min(sizes, key=sizes.get)
    if topk > sizes[smallest]:
        raise FusionlabError(f"distill.topk={topk} is more than the {sizes[smallest]} tokens of {smallest}'s "
                             f"vocabulary; use distill.topk <= {sizes[smallest]} (FuseChat keeps 10).")


def _check_val_check_interval(trainer, samples: int, batch_size: int) -> None:
    """Lightning refuses an integer ``val_check_interval`` above an epoch's batches only inside ``fit``, as a
    traceback; the same rule, in our words."""
    interval = getattr(trainer, "val_check_interval", None)
    if not isinstance(interval, int) or isinstance(interval, bool) or getattr(trainer, "check_val_every_n_epoch", 1) is None \
            or not getattr(trainer, "limit_val_batches", 1):
        return
    batches = math.ceil(math.ceil(samples / max(1, int(getattr(trainer, "world_size", 1)))) / batch_size)
    if interval > batches:
        raise FusionlabError(f"trainer.val_check_interval={interval} is more than the {batches} training batches of an "
                             f"epoch ({samples} fused samples, distill.batch_size={batch_size}); lower it, give a "
                             "fraction of an epoch (e.g. 0.5), or set trainer.check_val_every_n_epoch=null to count "
                             "batches across epochs.")


def _repr_metrics(name: str, stats: dict[str, int]) -> dict[str, int]:
    return {f"repr/{name}_kept": stats["kept"], f"repr/{name}_dropped_nan": stats["dropped_nan"],
            f"repr/{name}_dropped_no_assistant": stats["dropped_no_assistant"]}


def split_name(dc: DistillConfig) -> str:
    return "dev" if dc.data.dev else "heldout"


def scored_texts(dc: DistillConfig, pivot_tokenizer, conversations: list[dict] | None = None
                 ) -> tuple[list[dict[str, Any]], int]:
    """The conversations a run is scored on (held-out, or the dev slice with ``data.dev``) rendered and cut as
    the training texts, minus those whose reply starts after the cut; and how many were dropped so."""
    from fusionlab.distill.conversations import load_conversations, split_conversations
    from fusionlab.distill.representations import prepare_texts

    if conversations is None:
        _, heldout, dev = split_conversations(load_conversations(dc.data.path), dc.data.heldout,
                                              dc.data.heldout_seed, dc.data.dev_size)
        conversations = dev if dc.data.dev else heldout
    conversations = conversations[:dc.eval.limit]  # held-out order is file order: a fixed subset
    texts = [t for t in prepare_texts(pivot_tokenizer, conversations, dc.data.max_length) if t["spans"]]
    if not texts:
        raise FusionlabError(f"None of the {len(conversations)} {split_name(dc)} conversations has assistant text "
                             f"within distill.data.max_length={dc.data.max_length} pivot tokens; raise max_length.")
    return texts, len(conversations) - len(texts)


def score_checkpoints(dc: DistillConfig, checkpoints: dict[str, str | Path], seed: int = 0,
                      differences: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Held-out CE / perplexity (and the task of ``dc.eval``) of HF checkpoint dirs that share the pivot's
    tokenizer — FuseChat's table: the pivot, every pairwise target and their merge, on the SAME conversations
    and examples, with intervals and the paired ``differences`` [(a, b): a − b]."""
    from fusionlab.distill.evaluation import HeldoutScores
    from fusionlab.models import ModelSpec, load_model, load_tokenizer

    tok = load_tokenizer(dc.pivot)
    texts, dropped = scored_texts(dc, tok)
    scores = HeldoutScores(split_name(dc), differences=differences)
    for name, path in checkpoints.items():
        model, _ = load_model(ModelSpec(name=name, source="hf", path=str(path)))  # a NaN/inf target refused, named
        scores.score(name, model, tok, texts, dc.eval, dc.pivot.use_chat_template, seed)
        del model
        gc.collect()
    return {**scores.metrics(seed), f"{split_name(dc)}/dropped_no_assistant": dropped}


def prepare(dc: DistillConfig) -> FusedData:
    """Conversations in the pivot's template → representations of every model → targets aligned to the pivot."""
    from fusionlab.align import token_surfaces
    from fusionlab.align.vocab import special_ids
    from fusionlab.distill.conversations import dataset_fingerprint, load_conversations, split_conversations
    from fusionlab.distill.dist_align import build_fused_dataset, load_fused, save_fused
    from fusionlab.distill.representations import load_representations, prepare_texts, resolve_derived_sources
    from fusionlab.io import write_json
    from fusionlab.models import cache_dir, load_model, load_tokenizer

    if dc.cache_dir:  # before the derived sources' fine-tunes and any model load
        _cache_root(Path(dc.cache_dir).expanduser(), "distill.cache_dir")
    dc = resolve_derived_sources(dc)  # derived:<name> sources → their fine-tuned checkpoints
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    train, heldout, dev = split_conversations(load_conversations(dc.data.path), dc.data.heldout,
                                              dc.data.heldout_seed, dc.data.dev_size)
    convs = dc.data.train_slice(train)
    pivot_model, pivot_tok = load_model(dc.pivot)
    source_toks = {name: load_tokenizer(spec) for name, spec in dc.sources.items()}
    _check_topk(dc.topk, {"the pivot": pivot_tok, **{f"source {n!r}": tok for n, tok in source_toks.items()}})
    texts = prepare_texts(pivot_tok, convs, dc.data.max_length)
    heldout_texts, dropped = scored_texts(dc, pivot_tok, dev if dc.data.dev else heldout)
    metrics[f"{split_name(dc)}/dropped_no_assistant"] = dropped
    data_fp = dataset_fingerprint(texts)
    key = _hash({"pivot": dc.pivot, "data": data_fp, "topk": dc.topk, "max_length": dc.data.max_length,
                 "bos": dc.source_add_bos})
    root = Path(dc.cache_dir).expanduser() if dc.cache_dir else \
        _cache_root(cache_dir() / "distill" / key, "the distill cache ($FUSIONLAB_CACHE/distill/<hash>)")
    stats = _representations(dc.pivot, texts, root / "pivot", dc, add_bos=False, fingerprint=data_fp,
                             model=pivot_model, tokenizer=pivot_tok)
    metrics.update(_repr_metrics("pivot", stats))
    names = list(dc.sources)
    src_dirs = [root / f"source-{name}-{_hash(dc.sources[name])}" for name in names]
    for name, d in zip(names, src_dirs):
        stats = _representations(dc.sources[name], texts, d, dc, add_bos=dc.source_add_bos, fingerprint=data_fp)
        metrics.update(_repr_metrics(name, stats))
        gc.collect()  # one source model in memory at a time
    metrics["time/representations_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    m = dc.mapping
    key = [m, [(n, _hash(dc.sources[n])) for n in names], dc.topk, ALIGNMENT_VERSION]
    fused_path = root / f"fused-{_hash(key)}.safetensors"
    stats_path = Path(str(fused_path) + ".stats.json")
    if fused_path.is_file() and stats_path.is_file():
        records, astats = load_fused(fused_path), json.loads(stats_path.read_text())
    else:
        sources = [load_representations(d) for d in src_dirs]
        src_surfaces = [token_surfaces(source_toks[n]) for n in names]
        records, astats = build_fused_dataset(load_representations(root / "pivot"), sources, token_surfaces(pivot_tok),
                                              src_surfaces, method=m.method, k=dc.topk,
                                              substring_weight=m.substring_weight, one_to_one=m.one_to_one,
                                              min_exact_rate=m.min_exact_rate, names=names,
                                              pivot_specials=special_ids(pivot_tok))
        save_fused(records, fused_path)
        records = load_fused(fused_path)  # the lazy memory-mapped view: no rank keeps the whole set in RAM
        write_json(stats_path, astats)
    for name in names:  # a source whose top-k barely maps into the pivot vocabulary would train on one-hots only
        coverage = astats.get(f"{name}/vocab_coverage")
        if coverage is not None and not astats.get(f"{name}/same_vocab") and coverage < m.min_vocab_coverage:
            raise FusionlabError(f"Source {name!r} cannot be aligned to the pivot's vocabulary: only {coverage:.1%} of "
                                 f"its top-{dc.topk} token ids map to a pivot token with distill/mapping={m.method} "
                                 f"(distill.mapping.min_vocab_coverage={m.min_vocab_coverage}); try "
                                 "distill/mapping=mined, or check that its tokenizer is the model's.")
    metrics.update({f"align/{k}": v for k, v in astats.items()})
    metrics["time/alignment_s"] = round(time.perf_counter() - t0, 2)
    split = {"train": [c["id"] for c in convs], "heldout": [c["id"] for c in heldout], "dev": [c["id"] for c in dev]}
    return FusedData(records, pivot_model, pivot_tok, names, metrics, heldout_texts, split)


def fit(dc: DistillConfig, data: FusedData, trainer, output_dir: Path, *, optimizer: Callable | None = None,
        scheduler: Callable | None = None, seed: int = 0, log_prefix: str = "", eval_name: str = "fused",
        finish_wandb: bool = True) -> dict[str, Any]:
    """Train the pivot on the fused data with ``trainer`` (resuming per ``dc.resume``), then export it.

    Returns ``final/*`` (the trainer's last logged values and those of checkpoint-time evaluation
    callbacks, i.e. callbacks with a ``last_metrics`` dict), ``fit/*`` and the output paths; the trained
    model is left in ``data.trained_model``. ``log_prefix`` names the logged curves (the CLM twin's are
    ``baseline/train/…``); ``eval_name`` is the trained model's held-out column at checkpoints
    (``pl_module.heldout``, for the HeldoutEval callback); ``finish_wandb=False`` keeps the W&B run open.
    """
    import torch

    from fusionlab.distill.data import FuseDataModule
    from fusionlab.distill.evaluation import HeldoutSet
    from fusionlab.distill.module import FuseLightningModule, throughput_metrics
    from fusionlab.io import atomic_dir

    candidates = None if dc.pairwise_source is None else [0, 1 + data.source_names.index(dc.pairwise_source)]
    tok = data.pivot_tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    datamodule = FuseDataModule(data.records, batch_size=dc.batch_size, val_size=dc.data.val_size, seed=seed,
                                num_workers=dc.num_workers, pad_id=pad, candidates=candidates)
    _check_val_check_interval(trainer, len(datamodule.train), dc.batch_size)
    module = FuseLightningModule(data.pivot_model.train(), optimizer=optimizer, scheduler=scheduler, lam=dc.lam,
                                 temperature=dc.temperature, loss_type=dc.loss_type, fusion_mode=dc.fusion_mode,
                                 lora=dc.lora, gradient_checkpointing=dc.gradient_checkpointing,
                                 log_prefix=log_prefix)
    module.tokenizer = tok  # for callbacks (EVA eval, merge, Diff-eRank) that need to decode
    module.pivot_spec = dc.pivot
    module.heldout = HeldoutSet(split_name(dc), data.heldout, dc.eval, eval_name, dc.pivot.use_chat_template,
                                seed) if data.heldout else None
    ckpt = dc.resume_checkpoint(output_dir)
    if ckpt:
        log.info("Resuming from %s", ckpt)
    from fusionlab.distill.strategy import configure_wrap_policy

    configure_wrap_policy(trainer, module.model)  # FSDP: wrap the pivot's own decoder-layer class
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        if finish_wandb:
            _finish_wandb(trainer)
    fit_s = time.perf_counter() - t0
    data.trained_model = module.model
    world = trainer.world_size
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if hasattr(v, "item") and v.numel() == 1}
    for cb in trainer.callbacks:  # checkpoint-time evaluations (EVA eval, Diff-eRank, merge): their latest values
        final.update({k: float(v) for k, v in (getattr(cb, "last_metrics", None) or {}).items()
                      if isinstance(v, (int, float))})
    final = {k.removeprefix(log_prefix): v for k, v in final.items() if k.startswith(log_prefix)}
    metrics: dict[str, Any] = {f"final/{k.replace('/', '_')}": v for k, v in final.items()}
    metrics.update({"fit/steps": int(trainer.global_step), "fit/seconds": round(fit_s, 2),
                    **throughput_metrics(module, "fit", world), "fit/world_size": world, "fit/resumed": bool(ckpt)})
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint"] = str(last)

    sharded = type(trainer.strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy")
    if dc.export_model and trainer.is_global_zero and not sharded:  # the trained pivot as a plain HF directory
        model = module.model.merge_and_unload() if dc.lora else module.model
        with atomic_dir(Path(output_dir) / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        metrics["model_dir"] = str(Path(output_dir) / "model")
    elif sharded and dc.export_model:  # gathered from every rank (all take part), written by rank 0
        from fusionlab.distill.strategy import export_consolidated

        if export_consolidated(trainer, module, module.model, tok, Path(output_dir) / "model"):
            metrics["model_dir"] = str(Path(output_dir) / "model")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics


def _finish_wandb(trainer) -> None:
    if trainer.is_global_zero and any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
        import wandb

        wandb.finish()


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_settings(dc: DistillConfig, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a run's numbers depend on, for the W&B config: models, data, loss, alignment, optimizer."""
    opt = fit_kwargs.get("optimizer")
    return {"pivot": dc.pivot.name, "sources": {n: s.name for n, s in dc.sources.items()},
            "data": dataclasses.asdict(dc.data), "mapping": dataclasses.asdict(dc.mapping), "lam": dc.lam,
            "temperature": dc.temperature, "loss_type": dc.loss_type, "fusion_mode": dc.fusion_mode,
            "topk": dc.topk, "batch_size": dc.batch_size, "baseline": dc.baseline, "seed": fit_kwargs.get("seed"),
            "optimizer": getattr(opt, "func", type(opt)).__name__ if opt is not None else "AdamW",
            **{f"optimizer/{k}": v for k, v in (getattr(opt, "keywords", None) or {}).items()}}


def distill(dc: DistillConfig, make_trainer: Callable[[Path], Any], output_dir: Path, **fit_kwargs: Any) -> dict[str, Any]:
    """The whole pipeline into ``output_dir``: fused data → the untouched pivot scored on the held-out
    conversations → fit → the fused model scored → (``dc.baseline == "clm"``) the CLM twin trained from a
    fresh pivot on the same records, seed, optimizer and steps with λ = 1 in ``<output_dir>/baseline_clm``,
    scored on the same conversations → intervals and paired differences (:mod:`fusionlab.distill.evaluation`).

    ``make_trainer(dir)`` builds a Lightning Trainer writing under ``dir``, called once the fused data is
    ready. Everything numeric also goes to the trainers' loggers (W&B gets the run settings too).
    """
    from fusionlab.distill.evaluation import HeldoutScores
    from fusionlab.io import write_json
    from fusionlab.models import load_model

    output_dir = Path(output_dir)
    data = prepare(dc)
    if _is_rank_zero():
        write_json(output_dir / "split.json", data.split)
    seed = int(fit_kwargs.get("seed") or 0)
    scores = HeldoutScores(split_name(dc))
    chat = dc.pivot.use_chat_template
    t0 = time.perf_counter()
    if _is_rank_zero():
        scores.score("pivot", data.pivot_model, data.pivot_tokenizer, data.heldout, dc.eval, chat, seed)
    eval_s = time.perf_counter() - t0
    trainer = main_trainer = make_trainer(output_dir)
    metrics = {**data.metrics, **fit(dc, data, trainer, output_dir, finish_wandb=False, **fit_kwargs)}
    t0 = time.perf_counter()
    if trainer.is_global_zero:
        scores.score("fused", data.trained_model, data.pivot_tokenizer, data.heldout, dc.eval, chat, seed)
    eval_s += time.perf_counter() - t0
    if dc.baseline == "clm":
        twin_dc = dataclasses.replace(dc, lam=1.0)
        fresh, _ = load_model(dc.pivot)
        twin = FusedData(data.records, fresh, data.pivot_tokenizer, data.source_names, {}, data.heldout)
        data.trained_model = data.pivot_model = None  # the fused model is scored: free it before the twin trains
        gc.collect()
        out = output_dir / "baseline_clm"
        trainer = make_trainer(out)
        twin_metrics = fit(twin_dc, twin, trainer, out, log_prefix="baseline/", eval_name="clm", finish_wandb=False,
                           **fit_kwargs)
        metrics.update({f"baseline/{k}": v for k, v in twin_metrics.items()})
        t0 = time.perf_counter()
        if trainer.is_global_zero:
            scores.score("clm", twin.trained_model, data.pivot_tokenizer, data.heldout, dc.eval, chat, seed)
        eval_s += time.perf_counter() - t0
        if twin_metrics["fit/tokens_per_s"] and metrics["fit/tokens_per_s"]:  # both ran steps in this process
            metrics["fit/overhead_vs_clm"] = twin_metrics["fit/tokens_per_s"] / metrics["fit/tokens_per_s"] - 1.0
    metrics.update(scores.metrics(seed))
    metrics["time/eval_s"] = round(eval_s, 2)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in main_trainer.loggers:  # every align/, repr/, fit/, held-out number and the settings, in one place
        lg.log_hyperparams(run_settings(dc, fit_kwargs))
        lg.log_metrics(numbers, step=int(main_trainer.global_step))
        lg.save()
    _finish_wandb(main_trainer)
    return metrics


# ------------------------------------------------------------------------------------- FuseChat targets
def with_settings(config: Any, settings: dict[str, Any], where: str) -> Any:
    """``config`` (a dataclass) with ``settings`` applied, nested dicts into nested dataclasses; checked again."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in settings.items():
        if key not in names:
            raise FusionlabError(f"Unknown option {where}.{key}; valid options are {sorted(names)}.")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = with_settings(current, value, f"{where}.{key}")
        changes[key] = value
    return dataclasses.replace(config, **changes)


def target_config(dc: DistillConfig, name: str, target: PairwiseTarget, out: Path) -> DistillConfig:
    """The distill settings of pairwise target ``name``: ``target.distill`` applied, its rows of the training
    conversations (``data.start``/``data.limit``: the held-out split stays the same for every target), a
    cache sub dir when ``cache_dir`` is explicit (one data set per cache dir), and the model always
    exported (it is what gets merged)."""
    where = f"fusechat_merge.pairwise.{name}"
    try:
        tc = with_settings(dc, {**target.distill, "export_model": True}, f"{where}.distill")
        changes: dict[str, Any] = {}
        if tc.cache_dir:
            changes["cache_dir"] = str(Path(tc.cache_dir) / name)
        if target.rows is not None:
            start, stop = (list(target.rows) + [None])[:2]
            if stop is not None and stop <= start:
                raise FusionlabError(f"{where}.rows={list(target.rows)} selects no conversation; give [start, stop] "
                                     "with stop > start.")
            changes["data"] = dataclasses.replace(tc.data, start=start, limit=None if stop is None else stop - start)
        return dataclasses.replace(tc, **changes)
    except FusionlabError as err:  # a distill check (rows past the data, a bad value) under this target's name
        if str(err).startswith(where):
            raise
        raise FusionlabError(f"{where} (rows {target.rows}, distill {target.distill}): {err}") from None


def finished_target(out: Path) -> bool:
    """Whether the pairwise target in ``out`` was made already (its ``model/`` exists): it is reused, not refit."""
    return (Path(out) / "model" / "config.json").exists()


def pairwise_targets(dc: DistillConfig, pairwise: dict[str, PairwiseTarget], out_root: Path,
                     make_trainer: Callable[[Path], Any], **fit_kwargs: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """FuseChat's pairwise fusion targets: one distillation per entry, in ``<out_root>/<name>``.

    Every target's settings are checked before the first fit; a finished target (its ``model/``
    exists) is reused. Returns (name → model dir, ``pairwise/<name>/<metric>`` of the fits run now).
    """
    configs = {name: target_config(dc, name, t, out_root / name) for name, t in pairwise.items()}
    targets: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for name, tc in configs.items():
        out = out_root / name
        model_dir = out / "model"
        if finished_target(out):
            log.info("Pairwise target %s exists (%s): reused", name, model_dir)
        else:
            m = distill(tc, make_trainer, out, **fit_kwargs)
            metrics.update({f"pairwise/{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float, bool))})
            if not (model_dir / "config.json").exists():
                raise FusionlabError(f"The distillation of pairwise target {name!r} wrote no model at {model_dir} "
                                     "(a sharded strategy keeps it in the Lightning checkpoint); give "
                                     "fusechat_merge.targets instead.")
        targets[name] = str(model_dir)
    return targets, metrics


def pivot_checkpoint(spec: ModelSpec, out: Path) -> Path:
    """The pivot as a safetensors dir: the embedded/HF checkpoint itself, else (random, gguf) saved once to ``out``."""
    from fusionlab.io import atomic_dir
    from fusionlab.models import load_model
    from fusionlab.models.resolve import resolve_checkpoint

    if spec.source == "embedded" or (spec.source == "hf" and spec.path and Path(spec.path).expanduser().is_dir()):
        return Path(resolve_checkpoint(spec.path))
    if not (out / "config.json").exists():
        model, tok = load_model(spec)
        with atomic_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return out
