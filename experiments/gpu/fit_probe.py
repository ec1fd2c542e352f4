"""A Lightning callback the GPU check adds to a distill run from the command line:

    +callbacks.gpu_probe={_target_: fit_probe.FitProbe, path: probe.json}   (experiments/gpu on PYTHONPATH)

It records what the job's metrics.json does not: the time of every step (device-synchronised),
its tokens, its loss, and the peak device memory, so steady-state tokens/s and MFU leave out the
first steps (allocator and kernel set-up). Written at the end of the fit, and on a crash.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class FitProbe(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)
        self.steps: list[dict] = []
        self._t0 = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({"step": int(trainer.global_step), "seconds": time.perf_counter() - self._t0,
                           "tokens": int(batch["attention_mask"].sum()),
                           "padded_tokens": int(batch["attention_mask"].numel()),
                           "seq_len": int(batch["attention_mask"].shape[1]),
                           "loss": float(loss.detach().float()) if loss is not None else math.nan})

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "ok")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, f"{type(exception).__name__}: {exception}")

    def _write(self, trainer, status: str) -> None:
        if not trainer.is_global_zero:
            return
        cuda = torch.cuda.is_available()
        record = {"status": status, "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                  "global_step": int(trainer.global_step), "steps": self.steps,
                  "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                  "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=1))
