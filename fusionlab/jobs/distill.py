"""Job ``distill``: FuseChat / FuseLLM knowledge fusion.

representations (cached, resumable) → token/vocab/distribution alignment (cached) →
Lightning fit of the pivot (any strategy in ``conf/trainer``) → checkpoints (+ callbacks from
the ``callbacks`` group) → the trained pivot as an HF directory.

Under ddp/fsdp/deepspeed Lightning re-launches this command for the other ranks; they find
every cache complete and only read it.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.callbacks.base import EvalCallback
from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import lightning_loggers, to_dict

log = logging.getLogger(__name__)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    repo = Path(__file__).resolve().parents[2] / p  # relative to the fusionlab checkout
    return repo if repo.is_file() else p


def _representations(spec: dict, texts: list[dict], out_dir: Path, dc, *, add_bos: bool, fingerprint: str,
                     model=None, tokenizer=None) -> dict[str, int]:
    from fusionlab.distill.representations import extract_representations
    from fusionlab.models import load_model

    done = out_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    if model is None:
        model, tokenizer = load_model(spec)
    stats = extract_representations(model, tokenizer, texts, out_dir, name=spec["name"], topk=dc.topk,
                                    shard_size=dc.shard_size, batch_size=dc.extract_batch_size, add_bos=add_bos,
                                    max_length=4 * dc.data.max_length,  # a cap only: the text is already cut
                                    fingerprint=fingerprint)
    if stats["kept"] == 0:
        raise FusionlabError(f"Model {spec['name']!r} produced no usable representations: all "
                             f"{stats['dropped_nan']} NaN and {stats['dropped_no_assistant']} without assistant "
                             "tokens; check the data and model dtype.")
    from fusionlab.io import write_json

    write_json(done, stats)
    return stats


def _resume_path(resume: Any, output_dir: Path) -> str | None:
    if resume in (False, None, "false", "none", "null"):
        return None
    if resume in (True, "auto", "last"):
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    p = Path(str(resume)).expanduser()
    if not p.exists():
        raise FusionlabError(f"distill.resume={str(p)!r} does not exist; give a .ckpt path, auto or false.")
    return str(p)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate

    from fusionlab.distill.config import DistillConfig, align_config
    from fusionlab.distill.conversations import dataset_fingerprint, load_conversations
    from fusionlab.distill.data import FuseDataModule
    from fusionlab.distill.dist_align import build_fused_dataset, load_fused, save_fused
    from fusionlab.distill.module import FuseLightningModule
    from fusionlab.distill.representations import load_representations, prepare_texts
    from fusionlab.distill.vocab import token_surfaces
    from fusionlab.io import atomic_dir, write_json
    from fusionlab.models import cache_dir, load_model

    dc = DistillConfig.from_dict(to_dict(cfg.distill))
    ac = align_config(to_dict(cfg.get("align_method")))
    metrics: dict[str, Any] = {}

    # 1. texts in the pivot's template, and representations of every model over them
    t0 = time.perf_counter()
    convs = load_conversations(_data_path(dc.data.path), dc.data.limit)
    pivot_model, pivot_tok = load_model(dc.pivot)
    texts = prepare_texts(pivot_tok, convs, dc.data.max_length)
    data_fp = dataset_fingerprint(texts)
    key = _hash({"pivot": dc.pivot, "data": data_fp, "topk": dc.topk, "max_length": dc.data.max_length,
                 "bos": dc.source_add_bos})
    root = Path(dc.cache_dir).expanduser() if dc.cache_dir else cache_dir() / "distill" / key
    root.mkdir(parents=True, exist_ok=True)
    pstats = _representations(dc.pivot, texts, root / "pivot", dc, add_bos=False, fingerprint=data_fp,
                              model=pivot_model, tokenizer=pivot_tok)
    metrics.update({"repr/pivot_kept": pstats["kept"], "repr/pivot_dropped_nan": pstats["dropped_nan"],
                    "repr/pivot_dropped_no_assistant": pstats["dropped_no_assistant"]})
    names = list(dc.sources)
    src_dirs = []
    for name in names:
        spec = dc.sources[name]
        d = root / f"source-{name}-{_hash(spec)}"
        s = _representations(spec, texts, d, dc, add_bos=dc.source_add_bos, fingerprint=data_fp)
        metrics.update({f"repr/{name}_kept": s["kept"], f"repr/{name}_dropped_nan": s["dropped_nan"],
                        f"repr/{name}_dropped_no_assistant": s["dropped_no_assistant"]})
        src_dirs.append((name, spec, d))
        gc.collect()
    metrics["time/representations_s"] = round(time.perf_counter() - t0, 2)

    # 2. alignment to the pivot's tokens and vocabulary (cached per align settings)
    t0 = time.perf_counter()
    fused_path = root / f"fused-{_hash([ac.__dict__, [(n, _hash(s)) for n, s, _ in src_dirs], dc.topk])}.safetensors"
    stats_path = Path(str(fused_path) + ".stats.json")
    if fused_path.is_file() and stats_path.is_file():
        records, astats = load_fused(fused_path), json.loads(stats_path.read_text())
    else:
        from fusionlab.models import load_tokenizer, ModelSpec

        sources = [load_representations(d) for _, _, d in src_dirs]
        src_surfaces = [token_surfaces(load_tokenizer(ModelSpec.from_dict(spec))) for _, spec, _ in src_dirs]
        records, astats = build_fused_dataset(load_representations(root / "pivot"), sources, token_surfaces(pivot_tok),
                                              src_surfaces, method=ac.method, k=dc.topk,
                                              substring_weight=ac.substring_weight, one_to_one=ac.one_to_one,
                                              min_exact_rate=ac.min_exact_rate, names=names)
        save_fused(records, fused_path)
        write_json(stats_path, astats)
    metrics.update({f"align/{k}": v for k, v in astats.items()})
    metrics["time/alignment_s"] = round(time.perf_counter() - t0, 2)

    # 3. fit
    candidates = None
    if dc.pairwise_source is not None:
        candidates = [0, 1 + names.index(dc.pairwise_source)]
    pad = pivot_tok.pad_token_id if pivot_tok.pad_token_id is not None else 0
    datamodule = FuseDataModule(records, batch_size=dc.batch_size, val_size=dc.data.val_size, seed=int(cfg.seed or 0),
                                num_workers=dc.num_workers, pad_id=pad, candidates=candidates)
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = FuseLightningModule(pivot_model.train(), optimizer=optimizer, scheduler=scheduler, lam=dc.lam,
                                 temperature=dc.temperature, loss_type=dc.loss_type, fusion_mode=dc.fusion_mode,
                                 lora=dc.lora, gradient_checkpointing=dc.gradient_checkpointing)
    module.tokenizer = pivot_tok  # for callbacks (EVA eval, merge, Diff-eRank) that need to decode
    module.pivot_spec = dc.pivot
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()
                 if node is not None and "_target_" in node]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = lightning_loggers(cfg, output_dir)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt = _resume_path(dc.resume, output_dir)
    if ckpt:
        log.info("Resuming from %s", ckpt)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                wandb.finish()
    fit_s = time.perf_counter() - t0
    world = trainer.world_size
    cm = {k: float(v) for k, v in trainer.callback_metrics.items() if hasattr(v, "item") and v.numel() == 1}
    for cb in callbacks:  # checkpoint-time evaluations (EVA eval, Diff-eRank, merge): their latest values
        if isinstance(cb, EvalCallback):
            cm.update({k: float(v) for k, v in cb.last_metrics.items() if isinstance(v, (int, float))})
    metrics.update({f"final/{k.replace('/', '_')}": round(v, 6) for k, v in cm.items()})
    metrics.update({"fit/steps": int(trainer.global_step), "fit/seconds": round(fit_s, 2),
                    "fit/tokens": int(module.tokens_seen) * world,
                    "fit/tokens_per_s": round(module.tokens_seen * world / max(module.step_seconds, 1e-9), 2),
                    "fit/world_size": world, "fit/resumed": bool(ckpt)})
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        metrics["checkpoint"] = str(last)

    # 4. the trained pivot as a plain HF directory (unsharded strategies only)
    sharded = type(trainer.strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy")
    if dc.export_model and trainer.is_global_zero and not sharded:
        model = module.model.merge_and_unload() if dc.lora else module.model
        with atomic_dir(output_dir / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            pivot_tok.save_pretrained(tmp)
        metrics["model_dir"] = str(output_dir / "model")
    elif sharded:
        log.info("Sharded strategy: the model is in the Lightning checkpoint; convert it with the strategy's tools.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics
