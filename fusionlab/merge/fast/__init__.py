"""The merge engine's speed and memory tricks, fenced off here so the rest reads as plain torch.

Nothing in this package changes a number: each piece is a faster or leaner way to get exactly what
the obvious code gets, and each checks itself or falls back to the obvious code where its
assumption does not hold. Read the rest of :mod:`fusionlab.merge` as if this package were the
obvious code; come here only to change how fast or how lean a merge is.

Why each piece exists:

- :mod:`.exact` — **bit-equality with mergekit at O(n).** mergekit keeps "the top k entries by
  magnitude" with a full ``argsort``/``topk`` per delta. Fine-tuned deltas have many equal
  magnitudes at the density cut, and torch's CPU sort is libstdc++'s *unstable* introsort, so
  *which* tied entries mergekit keeps depends on that sort's partition order. ``exact`` replays
  only the partitions that contain the cut (vectorised, O(n) instead of O(n log n) comparisons),
  so TIES / breadcrumbs / SCE keep the same entries as mergekit; it also computes SCE's
  cross-model variance with torch's float64 Welford updates in cache-sized chunks. A self-check
  against torch at first use falls back to torch's own kernels on builds where they differ.
- :mod:`.memory` — **memory: about one tensor per input, not one model per input.** Checkpoints
  are memory-mapped copy-on-write and handed out as tensors that *are* the mapped pages (no copy),
  and a tensor's pages are dropped from this process once it is merged (they stay in the OS page
  cache). While a merge runs, glibc is told to keep freed blocks in the heap, so each tensor's
  buffers reuse the previous tensor's pages instead of faulting in fresh zeroed ones.
"""
