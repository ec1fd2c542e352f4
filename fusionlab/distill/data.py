"""Fused records → padded batches; a LightningDataModule with a deterministic shuffle.

Records are variable-length (never padded on disk); a batch is padded to its own longest
sample. Labels are the input ids on assistant tokens and -100 elsewhere (instruction tokens
and padding), so both loss terms see assistant tokens only.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fusionlab.errors import FusionlabError


class FuseDataset(Dataset):
    def __init__(self, records: Sequence[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]


def keep_candidates(records: list[dict[str, Any]], candidates: list[int]) -> list[dict[str, Any]]:
    """Records with only the chosen target distributions (of M), sliced once, not at every item load."""
    return [{**r, "target_ids": r["target_ids"][candidates], "target_logits": r["target_logits"][candidates],
             "ce": r["ce"][candidates]} for r in records]


def collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    B = len(samples)
    L = max(len(s["input_ids"]) for s in samples)
    M, _, k = samples[0]["target_ids"].shape
    batch = {"input_ids": torch.full((B, L), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(B, L, dtype=torch.long),
             "labels": torch.full((B, L), -100, dtype=torch.long),
             "target_ids": torch.full((B, M, L, k), -1, dtype=torch.long),
             "target_logits": torch.full((B, M, L, k), -torch.inf, dtype=torch.float32),
             "ce": torch.stack([torch.as_tensor(np.asarray(s["ce"], dtype=np.float32)) for s in samples])}
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids = torch.as_tensor(s["input_ids"], dtype=torch.long)
        batch["input_ids"][b, :n] = ids
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = torch.where(torch.as_tensor(s["assistant"]), ids, torch.full_like(ids, -100))
        batch["target_ids"][b, :, :n] = torch.as_tensor(s["target_ids"], dtype=torch.long)
        batch["target_logits"][b, :, :n] = torch.as_tensor(s["target_logits"], dtype=torch.float32)
    return batch


class SeededShuffle(Sampler[int]):
    """Shuffle from (seed, epoch) only, sharded over ranks, resumable mid-epoch.

    Lightning's own distributed sampler would reshuffle with its own seed, so trainers run with
    ``use_distributed_sampler=False`` and this sampler takes rank ``r`` of ``w`` the slice
    ``order[r::w]`` (padded to a multiple of ``w``). ``consumed`` counts samples trained on in
    this epoch (the module reports them); a resumed run skips exactly those.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.consumed, self.skip = 0, 0, 0
        self.skip_epoch = 0  # the epoch `skip` belongs to: a checkpoint at an epoch's end resumes at the next one

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        world, rank = self._world()
        if world > 1:
            order = (order + order[: (-len(order)) % world])[rank::world]
        skip, self.skip = (self.skip if self.epoch == self.skip_epoch else 0), 0
        self.consumed = skip
        return iter(order[skip:])

    def __len__(self) -> int:
        world, _ = self._world()
        return math.ceil(self.n / world)


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints (via the SeededShuffle sampler)."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self.sampler.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch, self.sampler.skip = int(state["epoch"]), int(state["consumed"])
        self.sampler.skip_epoch = self.sampler.epoch


class FuseDataModule(L.LightningDataModule):
    """Train/val loaders over fused records (a list, a lazy ``FusedSet``, or a path written by ``save_fused``)."""

    def __init__(self, records: Sequence[dict[str, Any]] | str | os.PathLike, batch_size: int = 2, val_size: int = 0,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0, pad_id: int = 0,
                 candidates: list[int] | None = None):
        super().__init__()
        from fusionlab.distill.dist_align import FusedSet, load_fused

        if isinstance(records, (str, os.PathLike)):
            records = load_fused(records)  # lazy: memory-mapped, one record read per item
        if len(records) == 0:
            raise FusionlabError("The fused training set is empty: every sample was dropped (NaN or no assistant "
                                 "tokens); check the conversation data.")
        if val_size >= len(records):
            raise FusionlabError(f"distill.data.val_size={val_size} leaves no training samples out of {len(records)}.")
        if candidates is not None:  # which of the M target distributions to keep (None = all)
            records = records.with_candidates(candidates) if isinstance(records, FusedSet) else \
                keep_candidates(records, candidates)
        self.val = FuseDataset(records[:val_size]) if val_size else None
        self.train = FuseDataset(records[val_size:])
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_workers, self.pad_id = num_workers, pad_id
        self.sampler: SeededShuffle | None = None

    def _collate(self, samples):
        return collate(samples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        self.sampler = SeededShuffle(len(self.train), self.seed, self.shuffle)
        return ResumableLoader(self.train, batch_size=self.batch_size, sampler=self.sampler, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def mark_consumed(self, n: int) -> None:
        """Called by the module for every training batch, so checkpoints know where the epoch stands."""
        if self.sampler is not None:
            self.sampler.consumed += n

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self._collate, num_workers=self.num_workers)
