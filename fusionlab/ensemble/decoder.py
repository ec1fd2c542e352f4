"""EVA ensemble decoding: one main and N aux models, KV-cached, batched, exactly synchronised.

Every step each model scores its own context (the members concurrently), a candidate rule
(:mod:`~fusionlab.ensemble.candidates`: EVA's own top-k, UniTE's union) puts every member's
distribution into the main vocabulary through its :class:`~fusionlab.align.Alignment`, a gate
(:mod:`~fusionlab.ensemble.gates`) says whether this step is ensembled at all, the drop filter and
a combiner pick one main token, and that token's TEXT is appended to every model's context.
Unlike the reference (full re-tokenisation and re-computation of every prompt each step,
batch size 1), each model keeps a KV cache; an aux model only re-tokenises its last few
tokens and rolls back the ones whose segmentation changed.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from fusionlab.align.alignment import Alignment, output_embeddings
from fusionlab.align.vocab import token_bytes, tokenizer_hash
from fusionlab.ensemble.candidates import CANDIDATES, Projection
from fusionlab.ensemble.combine import COMBINERS, dense, drop_filter, takes, topk_probs
from fusionlab.ensemble.config import DecodingOptions
from fusionlab.ensemble.gates import GATES, needs_members
from fusionlab.ensemble.sync import TextSync
from fusionlab.errors import FusionlabError
from fusionlab.models.generation import check_context, check_logits


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as HF ``generate`` would see them: BOS added unless the text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def align_members(main, aux: Sequence, method: str, params: dict[str, Any], cache_dir, rebuild: bool = False) -> list[Alignment]:
    """One alignment per aux ``(model, tokenizer)`` onto ``main``'s vocabulary (cached), with each aux
    model's end-of-turn tokens sent to main's EOS. An aux that shares main's tokenizer (two fine-tunes of one
    base) gets the exact identity projection whatever ``method`` says: a learned map could only lose mass."""
    from fusionlab.align import align
    from fusionlab.align.methods import same_vocabulary

    def one(model, tok) -> Alignment:
        if tokenizer_hash(tok) == tokenizer_hash(main[1]):
            return same_vocabulary(tok, main[1], output_embeddings(model).shape[0],
                                   output_embeddings(main[0]).shape[0], sorted(eos_ids(model, tok)))
        return align(model, tok, *main, method, cache_dir=cache_dir, rebuild=rebuild,
                     aux_eos_ids=sorted(eos_ids(model, tok)), **params)

    return [one(model, tok) for model, tok in aux]


class _Stream:
    """One model's batched context: KV cache + a slot mask (0 = padding or a hole)."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], use_cache: bool, own_cuda_stream: bool = False):
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache
        self.device = next(model.parameters()).device
        # members that run concurrently on one GPU need their own CUDA streams to overlap
        self.cuda_stream = torch.cuda.Stream(self.device) if own_cuda_stream and self.device.type == "cuda" else None
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.seqs = [list(p) for p in prompts]  # real tokens per row (what the model has seen or will see)
        self.slots: list[list[int]] = [[] for _ in prompts]  # cache slot of each fed token
        self.pending: list[list[int]] = [list(p) for p in prompts]
        self.cache = None
        self.mask = torch.zeros(len(prompts), 0, dtype=torch.long)
        self.last_logits: torch.Tensor | None = None
        self.forward_tokens = 0

    def rollback(self, row: int, n: int) -> None:
        """Forget the last ``n`` tokens of ``row`` (fed or pending)."""
        if n <= 0:
            return
        n_pending = len(self.pending[row])
        if n <= n_pending:
            self.pending[row] = self.pending[row][:n_pending - n]
        else:
            self.pending[row] = []
        self.seqs[row] = self.seqs[row][:len(self.seqs[row]) - n]

    def push(self, row: int, ids: Sequence[int]) -> None:
        self.seqs[row].extend(ids)
        self.pending[row].extend(ids)

    def select(self, rows: torch.Tensor) -> None:
        keep = rows.tolist()
        self.seqs = [self.seqs[i] for i in keep]
        self.slots = [self.slots[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
        self.mask = self.mask[rows]
        if self.last_logits is not None:
            self.last_logits = self.last_logits[rows.to(self.last_logits.device)]
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.batch_select_indices(rows.to(self.device))

    def logits_on_own_stream(self) -> torch.Tensor:
        """:meth:`logits`, on this member's CUDA stream when it has one (finished before returning)."""
        if self.cuda_stream is None:
            return self.logits()
        with torch.cuda.stream(self.cuda_stream):
            out = self.logits()
        self.cuda_stream.synchronize()
        return out

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """Next-token logits (B, V) of every row, after feeding what is pending; finite (else an error naming the
        model: a NaN would pass the projections and combiners as a plausible-looking token)."""
        logits = self._cached() if self.use_cache else self._uncached()
        check_logits(logits, self.model)
        return logits

    def _uncached(self) -> torch.Tensor:
        width = max(len(s) for s in self.seqs)
        ids = torch.full((len(self.seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(self.seqs):
            ids[b, width - len(s):] = torch.tensor(s)
            mask[b, width - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=False)
        self.forward_tokens += int(mask.sum())
        self.pending = [[] for _ in self.seqs]
        self.last_logits = out.logits[:, -1].float()
        return self.last_logits

    def _cached(self) -> torch.Tensor:
        from transformers import DynamicCache

        # Rows whose fed tokens were rolled back: crop every row to the earliest such slot and re-queue.
        n_slots = self.mask.shape[1]
        cut = n_slots
        for b in range(len(self.seqs)):
            fed = len(self.seqs[b]) - len(self.pending[b])
            if fed < len(self.slots[b]):
                cut = min(cut, self.slots[b][fed])
        if cut < n_slots:
            for b in range(len(self.seqs)):
                keep = sum(1 for s in self.slots[b] if s < cut)
                self.slots[b] = self.slots[b][:keep]
                self.pending[b] = self.seqs[b][keep:]
            self.cache.crop(cut - n_slots)
            self.mask = self.mask[:, :cut]
            n_slots = cut
        width = max(len(p) for p in self.pending)
        if width == 0:
            return self.last_logits
        # New tokens are right-aligned (holes on the left, masked), so every row's last real token
        # sits in the last column: only that column goes through the lm_head (a 262k-row matrix
        # for Gemma; a prompt's other positions would cost prompt_len times one step's logits).
        ids = torch.full((len(self.seqs), width), self.pad, dtype=torch.long)
        new_mask = torch.zeros_like(ids)
        n_new = 0
        for b, p in enumerate(self.pending):
            if p:
                ids[b, width - len(p):] = torch.tensor(p)
                new_mask[b, width - len(p):] = 1
                self.slots[b].extend(range(n_slots + width - len(p), n_slots + width))
                n_new += len(p)
        mask = torch.cat([self.mask, new_mask], dim=1)
        pos = (mask.cumsum(1) - 1).clamp_min(0)[:, n_slots:]
        if self.cache is None:
            self.cache = DynamicCache()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        self.forward_tokens += n_new
        logits = out.logits[:, -1].float()
        empty = [b for b, p in enumerate(self.pending) if not p]
        if empty and self.last_logits is not None:  # rows with nothing new keep their previous logits
            idx = torch.tensor(empty, device=logits.device)
            logits[idx] = self.last_logits[idx]
        self.mask, self.last_logits = mask, logits
        self.pending = [[] for _ in self.seqs]
        return logits


class _Background:
    """An aux stream kept up to date on a worker thread while the main model decodes.

    With a gate that reads only the main model, most steps need no aux distribution, yet the aux
    model must have seen every token by the next step that does. The decoding thread queues the
    stream's updates (rollback / push / select) here; the worker applies them at the start of its
    next forward, so only the worker touches the stream while a forward is in flight. :meth:`start`
    hands the queue to the worker unless it is still busy (a step that does not fire never waits);
    :meth:`logits` returns the distribution after everything queued, waiting for the worker and
    finishing the rest itself. A fired step then costs the aux model's lag behind the main model,
    not a whole aux forward after the main one; the same tokens reach the same cache either way.
    """

    def __init__(self, stream: _Stream, pool: ThreadPoolExecutor):
        self.stream, self.pool = stream, pool
        self.ops: list[tuple[str, tuple]] = []  # queued, not yet applied to the stream
        self.future = None
        self.latest: torch.Tensor | None = None  # the logits once everything handed over so far is applied
        self.background_forwards = 0

    def rollback(self, row: int, n: int) -> None:
        if n > 0:
            self.ops.append(("rollback", (row, n)))

    def push(self, row: int, ids: Sequence[int]) -> None:
        if ids:
            self.ops.append(("push", (row, list(ids))))

    def select(self, rows: torch.Tensor) -> None:
        self.ops.append(("select", (rows,)))

    def _run(self, ops: list[tuple[str, tuple]]) -> torch.Tensor:
        for name, args in ops:
            getattr(self.stream, name)(*args)
        return self.stream.logits_on_own_stream()

    def _collect(self) -> None:
        if self.future is not None:
            self.latest, self.future = self.future.result(), None

    def start(self) -> None:
        """Hand the queued updates to the worker, unless it is still busy with earlier ones."""
        if self.future is not None and self.future.done():
            self._collect()
        if self.future is None and (self.ops or self.latest is None):
            ops, self.ops, self.latest = self.ops, [], None
            self.future = self.pool.submit(self._run, ops)
            self.background_forwards += 1

    def logits(self) -> torch.Tensor:
        """Next-token logits after every queued update."""
        self._collect()
        if self.ops or self.latest is None:
            ops, self.ops = self.ops, []
            self.latest = self._run(ops)
        return self.latest

    def finish(self) -> None:
        self._collect()


@dataclass
class EnsembleOutput:
    texts: list[str]
    new_tokens: list[int]
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)  # counts; summarize() turns them into shares

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def add_stats(total: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """Sum the counts of several ``generate`` calls (batches)."""
    for k, v in stats.items():
        total[k] = total.get(k, 0) + v
    return total


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Shares from summed counts: the gate's firing rate, the drop filter's verdicts over the ensembled
    row-steps, the aux forward passes skipped, and the aux mass that projected nowhere."""
    out = {k: v for k, v in stats.items() if not k.startswith(("filter_", "aux_unmapped_"))}
    rows, fired = max(stats.get("row_steps", 0), 1), stats.get("ensembled_row_steps", 0)
    out["gate_fired_frac"] = round(fired / rows, 4)
    out["aux_forward_frac"] = round(stats.get("aux_forward_steps", 0) / max(stats.get("steps", 0), 1), 4)
    for k, v in stats.items():
        if k.startswith("filter_"):
            out[f"{k}_frac"] = round(v / max(fired, 1), 4)
        elif k.startswith("aux_unmapped_"):
            out[f"{k}_mass"] = round(v / max(stats.get("aux_row_steps", 0), 1), 4)
    return out


class EvaDecoder:
    """Ensemble decoding of ``main`` with ``aux`` models through vocabulary alignments.

    ``main`` and each of ``aux`` are ``(model, tokenizer)``; ``alignments[i]`` projects aux i's
    vocabulary onto the main one. Options: a :class:`~fusionlab.ensemble.config.DecodingOptions`
    (``options=``) or its fields as keywords. Each step runs the members concurrently (one thread
    each, ``threads`` torch threads per member, by default the cores divided among them; CUDA members
    on their own streams), so a step costs about the slowest member, not their sum. Under a gate
    that reads only the main model, parallel aux members catch up in the background and a step waits
    for them only where it fires; in turn (``parallel=False``) they run only at fired steps.
    """

    def __init__(self, main, aux=(), alignments: Sequence[Alignment] = (), options: DecodingOptions | None = None,
                 **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("give EvaDecoder either options= or keyword options, not both")
        if len(aux) != len(alignments):
            raise FusionlabError(f"{len(aux)} aux models but {len(alignments)} alignments: give one per aux model.")
        self.options = opts = options.decoding() if options is not None else DecodingOptions(**kwargs)
        opts.check_members(len(aux))
        self.main, self.aux = main, list(aux)
        self.main_vocab = main_vocab = output_embeddings(main[0]).shape[0]
        for (m, _), a in zip(self.aux, alignments):
            aux_vocab = output_embeddings(m).shape[0]
            if a.main_vocab != main_vocab or a.aux_vocab > aux_vocab:
                raise FusionlabError(f"Alignment {a.method!r} maps {a.aux_vocab} -> {a.main_vocab} tokens but the "
                                     f"models have {aux_vocab} -> {main_vocab}.")
        self.projections = [Projection(a.to(next(main[0].parameters()).device)) for a in alignments]
        self.combiner, self.candidates, self.gate = COMBINERS[opts.combiner], CANDIDATES[opts.candidates], GATES[opts.gate]
        self.combiner_kwargs = {"weights": opts.weights} if takes(self.combiner, "weights") else {}
        self.gate_kwargs = ({"threshold": opts.gate_threshold}
                            if takes(self.gate, "threshold") and opts.gate_threshold is not None else {})
        # when the gate decides: before the aux models run (main only), after them, or never (always fires)
        self.gate_mode = ("members" if needs_members(self.gate) else
                          "main" if takes(self.gate, "main_probs") else "always")
        main_hash = tokenizer_hash(main[1])
        self.passthrough = [opts.sync == "auto" and tokenizer_hash(t) == main_hash for _, t in self.aux]
        self.main_bytes = token_bytes(main[1], main_vocab)
        self.eos = eos_ids(*main)

    @property
    def threads(self) -> int:
        return self.options.member_threads(1 + len(self.aux))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[str]], max_new_tokens: int = 128,
                 stop: Sequence[str] = (), progress: bool = False) -> EnsembleOutput:
        """Decode one batch. ``prompts[m][b]`` is row b's prompt in model m's format (main first);
        a flat list of strings is used for every model."""
        n_models = 1 + len(self.aux)
        if prompts and isinstance(prompts[0], str):
            prompts = [list(prompts)] * n_models
        if len(prompts) != n_models or len({len(p) for p in prompts}) != 1:
            raise FusionlabError(f"Give one list of prompts per model ({n_models}), all of the same length.")
        threads, saved_threads = self.threads, torch.get_num_threads()
        parallel = self.options.parallel and n_models > 1
        torch.set_num_threads(threads)
        # the aux members' workers (the main model runs on this thread)
        pool = (ThreadPoolExecutor(n_models - 1, initializer=torch.set_num_threads, initargs=(threads,))
                if parallel else None)
        try:
            return self._generate(prompts, max_new_tokens, stop, progress, pool)
        finally:
            if pool is not None:
                pool.shutdown()
            torch.set_num_threads(saved_threads)

    def _forward(self, streams: Sequence[_Stream], pool: ThreadPoolExecutor | None) -> list[torch.Tensor]:
        """Next-token logits of each stream; concurrently when there is a pool and more than one stream
        (the first on the calling thread: one hand-off fewer per step)."""
        if pool is None or len(streams) < 2:
            return [s.logits_on_own_stream() for s in streams]
        others = [pool.submit(s.logits_on_own_stream) for s in streams[1:]]
        return [streams[0].logits_on_own_stream(), *[f.result() for f in others]]

    def _generate(self, prompts, max_new_tokens, stop, progress, pool) -> EnsembleOutput:
        opts = self.options
        n_models, batch = 1 + len(self.aux), len(prompts[0])
        start = time.perf_counter()
        members = [self.main, *self.aux]
        streams = [_Stream(m, t, [encode_prompt(t, p) for p in ps], opts.use_cache, own_cuda_stream=pool is not None)
                   for (m, t), ps in zip(members, prompts)]
        for s in streams:  # every member reads the whole answer too (an aux in its own tokens: about as many)
            check_context(s.model, max((len(q) for q in s.seqs), default=0), max_new_tokens)
        syncs = [[None if self.passthrough[i] else TextSync(t, opts.window) for _ in range(batch)]
                 for i, (_, t) in enumerate(self.aux)]
        # a gate that reads only the main model decides before any aux distribution is needed: with parallel
        # members the aux models then catch up in the background and a step waits for them only when it fires
        background = self.gate_mode == "main" and pool is not None
        aux_streams = [_Background(s, pool) for s in streams[1:]] if background else streams[1:]
        gen_ids: list[list[int]] = [[] for _ in range(batch)]
        gen_text = [b"" for _ in range(batch)]
        finished_text: list[str | None] = [None] * batch
        active = list(range(batch))  # original row index of each live row
        stop = [s for s in stop if s]
        generator = torch.Generator().manual_seed(opts.seed) if opts.do_sample else None
        counts = {"steps": 0, "row_steps": 0, "ensembled_row_steps": 0, "aux_forward_steps": 0, "aux_row_steps": 0,
                  **{f"filter_kept_{k}": 0 for k in range(n_models + 1)},  # 0 = none passed, all were used
                  **{f"filter_model{m}_kept": 0 for m in range(n_models)},
                  **{f"aux_unmapped_{i}": 0.0 for i in range(n_models - 1)}}
        rollbacks = 0
        stop_tail = max((len(s) for s in stop), default=0) * 4 + 64  # bytes of text that can hold a stop string
        for _ in tqdm(range(max_new_tokens), desc="eva", disable=not progress, leave=False):
            aux_logits, fire, main_top = None, None, None
            if n_models == 1:
                main_logits = streams[0].logits()
            elif self.gate_mode == "main":  # aux distributions only at steps where a row fires
                if background:
                    for s in aux_streams:
                        s.start()
                main_logits = streams[0].logits()
                main_top = topk_probs(main_logits, opts.topk)
                fire = self.gate(main_probs=main_top[0], **self.gate_kwargs)
                # in turn, the skipped tokens are fed now, in one forward; in the background the first step's
                # aux prefill overlaps the main one's and is always used (the unmapped mass is then measured
                # even where the gate never fires)
                if bool(fire.any()) or (background and counts["steps"] == 0):
                    aux_logits = [s.logits() for s in aux_streams]
            else:
                main_logits, *aux_logits = self._forward(streams, pool)
            p, ids = main_top if main_top is not None else topk_probs(main_logits, opts.topk)
            combined = dense(p, ids, self.main_vocab)  # the main model alone
            counts["steps"] += 1
            counts["row_steps"] += len(active)
            if aux_logits is not None:
                dists, unmapped = self.candidates([main_logits, *aux_logits], self.projections, opts.topk,
                                                  self.main_vocab)
                if self.gate_mode == "members":
                    fire = self.gate(dists=dists, **self.gate_kwargs)
                elif fire is None:
                    fire = torch.ones(len(active), dtype=torch.bool, device=dists.device)
                keep = drop_filter(dists, opts.drop, opts.keep_main) & (dists.sum(dim=-1) > 0)
                keep[0] |= ~keep.any(dim=0)  # an aux model whose mass projected nowhere is never the only one
                combined = torch.where(fire[:, None], self.combiner(dists, keep, **self.combiner_kwargs), combined)
                fired = keep[:, fire]
                counts["ensembled_row_steps"] += int(fire.sum())
                counts["aux_forward_steps"] += 1
                counts["aux_row_steps"] += len(active)
                for m, n in enumerate(fired.sum(dim=1).tolist()):  # one device read each, not one per row
                    counts[f"filter_model{m}_kept"] += n
                for n, c in enumerate(torch.bincount(fired.sum(dim=0), minlength=n_models + 1).tolist()):
                    counts[f"filter_kept_{n}"] += c
                for i, u in enumerate(unmapped.sum(dim=1).tolist()):
                    counts[f"aux_unmapped_{i}"] += u
            if opts.do_sample:
                w = combined.clamp_min(0).pow(1.0 / opts.temperature)
                nxt = torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
            else:
                nxt = combined.argmax(dim=-1)
            done = []
            for b, tok in enumerate(nxt.tolist()):
                row = active[b]
                if tok in self.eos:
                    done.append(b)
                    continue
                gen_ids[row].append(tok)
                gen_text[row] += self.main_bytes[tok] or b""
                streams[0].push(b, [tok])
                for i, stream in enumerate(aux_streams):
                    if syncs[i][row] is None:
                        stream.push(b, [tok])
                    else:
                        back, new = syncs[i][row].update(gen_text[row])
                        rollbacks += back
                        stream.rollback(b, back)
                        stream.push(b, new)
                if stop:
                    tail = gen_text[row][-stop_tail:].decode("utf-8", "ignore")
                    if any(s in tail for s in stop):
                        done.append(b)
            if done:
                for b in done:
                    finished_text[active[b]] = gen_text[active[b]].decode("utf-8", "replace")
                live = torch.tensor([b for b in range(len(active)) if b not in set(done)], dtype=torch.long)
                active = [active[b] for b in live.tolist()]
                if not active:
                    break
                for s in (streams[0], *aux_streams):
                    s.select(live)
        texts = []
        for row in range(batch):
            text = finished_text[row] if finished_text[row] is not None else gen_text[row].decode("utf-8", "replace")
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            texts.append(text if cut < 0 else text[:cut])
        if background:  # a catch-up still in flight is part of this call's time and forward_tokens
            for s in aux_streams:
                s.finish()
            counts["aux_background_forwards"] = sum(s.background_forwards for s in aux_streams)
        seconds = time.perf_counter() - start
        new_tokens = [len(g) + (1 if finished_text[r] is not None and len(g) < max_new_tokens else 0)
                      for r, g in enumerate(gen_ids)]
        stats = {**counts, "rollbacks": rollbacks,
                 "sync_mismatches": sum(s.mismatches for rows in syncs for s in rows if s is not None),
                 "forward_tokens": sum(s.forward_tokens for s in streams), "tokens_with_eos": sum(new_tokens)}
        return EnsembleOutput(texts, [len(g) for g in gen_ids], seconds, stats)
