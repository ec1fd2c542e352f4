"""Merging across tokenizers: the output vocabulary, and every input's embedding rows in it.

``merge.tokenizer_source`` (``base`` | ``union`` | ``model:<ref>``) or the ``merge.tokenizer:``
section (:class:`TokenizerConfig`, mergekit's block) picks the output tokenizer:

- ``base``: the reference model's (the base, else the first model), the others' rows mapped onto it;
- ``union``: the base's tokenizer plus every input token it cannot spell, appended as added tokens;
- ``model:<ref>`` (or a bare model reference, as mergekit writes it): that tokenizer; its model's
  weights, when present, are one more *donor* of rows (``tokensurgeon``: a transplant onto it).

Each input then sees its token-indexed tensors (embeddings, lm_head) in the output vocabulary
(:class:`VocabularyView` wraps its reader, so the engine merges them like any tensor). A token the
input spells (same bytes, :func:`fusionlab.align.vocab.token_bytes`: ``Ġthe`` == ``▁the``) keeps the
input's own row. A token it lacks is filled — unlike mergekit, which copies another model's raw row
or zeros — from fusionlab's alignment: the EVA projection (VecMap + CSLS, :func:`fusionlab.align.align`)
of a donor that has the token onto the input's own vocabulary gives the input's nearest tokens and
weights, and the row is their weighted mean (rescaled to their mean norm). Where the projection has
no entry (CSLS threshold, control tokens) or no donor has the token, the row is the mean of the
input's rows of the token's own pieces (a greedy longest-match split of its bytes over the input's
vocabulary). ``fill`` = ``donor`` | ``mean`` | ``zero`` are mergekit's and the usual baselines,
kept to measure against (experiments/merge/bench_tokenizer.py).

Everything that can fail (a source that does not exist, a token entry naming a model that is no
input, a tokenizer that cannot be read) fails in :func:`plan_vocabulary`, from tokenizers and
headers only; the alignments need embeddings and are built when the first token-indexed tensor is read.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge.derive import PerplexityEval
from fusionlab.merge.io import AUX_FILES, EMBED_NAMES, LM_HEAD_NAMES, CheckpointReader, is_embedding
from fusionlab.models.resolve import DERIVED_PREFIX

log = logging.getLogger(__name__)

MODEL_PREFIX = "model:"
FILLS = ("alignment", "donor", "mean", "zero")  # how a row an input lacks is made (alignment: fusionlab's)
TOKENIZER_FILES = tuple(f for f in AUX_FILES if f not in ("generation_config.json",))


def _ref_exists(ref: str) -> bool:
    from fusionlab.models.embedded import EMBEDDED_MODELS

    return ref.startswith(DERIVED_PREFIX) or ref in EMBEDDED_MODELS or Path(ref).expanduser().exists()


def source_model(source: str | None) -> str | None:
    """The model reference of a tokenizer source (``model:<ref>`` or a bare ref); None for base / union."""
    if source in (None, "base", "union"):
        return None
    return source.removeprefix(MODEL_PREFIX)


def check_source(source: str | None, key: str) -> None:
    """A tokenizer source is ``base``, ``union`` or an existing model (``model:<ref>``): else a FusionlabError."""
    ref = source_model(source)
    if ref is not None and (not ref or not _ref_exists(ref)):
        raise FusionlabError(f"{key}={source!r}: the tokenizer source does not exist. Use base, union or "
                             "model:<dir | embedded name | derived:<name>> (a directory with the tokenizer files).")


@dataclass
class TokenEmbedding:
    """Where one output token's rows come from (an entry of mergekit's ``tokenizer.tokens``)."""

    source: str | None = None  # a model (its row of this token), "zero", or null (the default fill)
    token: str | None = None  # with a model source: that model's row of this token instead (mergekit's model_token)
    token_id: int | None = None  # ... or of this id
    force: bool = False  # also for the models that have the token

    def check(self, where: str) -> None:
        if self.token is not None and self.token_id is not None:
            raise FusionlabError(f"{where}: give token or token_id, not both.")
        if (self.token is not None or self.token_id is not None) and self.source in (None, "zero"):
            raise FusionlabError(f"{where}: token/token_id name a row of the model given as source; set source.")
        if self.source not in (None, "zero") and not _ref_exists(self.source):
            raise FusionlabError(f"{where}: source={self.source!r} is neither 'zero' nor an existing model.")


def _token_entry(entry: Any, where: str) -> TokenEmbedding:
    """A tokens entry: ours, or mergekit's form (``source: {kind: zero}`` / ``{kind: model_token, model, token}``)."""
    if isinstance(entry, TokenEmbedding):
        return entry
    entry = dict(entry or {})
    src = entry.get("source")
    if isinstance(src, Mapping):
        if src.get("kind") == "zero":
            entry["source"] = "zero"
        elif src.get("kind") == "model_token":
            model = src.get("model")
            entry.update(source=str(model.get("path", model) if isinstance(model, Mapping) else model),
                         token=src.get("token"), token_id=src.get("token_id"))
        else:
            raise FusionlabError(f"{where}: source={src!r} has an unknown kind; use zero or model_token (or a model).")
    unknown = sorted(set(entry) - {"source", "token", "token_id", "force"})
    if unknown:
        raise FusionlabError(f"{where}: unknown key(s) {unknown}; an entry has source, token, token_id, force.")
    return TokenEmbedding(**entry)


@dataclass
class TokenizerConfig:
    """The ``merge.tokenizer:`` section (mergekit's ``tokenizer:`` block, plus ``fill``)."""

    source: str = "union"  # base | union | model:<ref>
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)  # token text -> its rows (added if new)
    pad_to_multiple_of: int | None = None  # round the vocabulary up (padding rows: each input's mean row)
    fill: str = "alignment"  # rows an input lacks: alignment (EVA projection, else pieces) | donor | mean | zero

    def __post_init__(self) -> None:
        check_source(self.source, "merge.tokenizer.source")
        if self.fill not in FILLS:
            raise FusionlabError(f"merge.tokenizer.fill={self.fill!r}: use one of {list(FILLS)}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise FusionlabError(f"merge.tokenizer.pad_to_multiple_of={self.pad_to_multiple_of}: use null or >= 1.")
        self.tokens = {t: _token_entry(e, f"merge.tokenizer.tokens[{t!r}]") for t, e in self.tokens.items()}
        for t, e in self.tokens.items():
            e.check(f"merge.tokenizer.tokens[{t!r}]")



def tokenizer_config(tokenizer: TokenizerConfig | None, tokenizer_source: str | None) -> TokenizerConfig | None:
    """The one tokenizer plan of a merge: the section, else ``tokenizer_source`` alone, else none (copy the base's)."""
    if tokenizer is not None and tokenizer_source is not None:
        raise FusionlabError(f"merge.tokenizer_source={tokenizer_source!r} and merge.tokenizer are both set; "
                             "give one (tokenizer.source is the same setting).")
    if tokenizer is not None:
        return tokenizer
    return TokenizerConfig(source=tokenizer_source) if tokenizer_source is not None else None


# ---------------------------------------------------------------------------------------- tokenizers
def load_tokenizer(path: str | os.PathLike, label: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError/... for a dir without tokenizer files
        raise FusionlabError(f"Cannot load the tokenizer of {label} from {path} ({type(e).__name__}: {e}); merging "
                             "across tokenizers needs each input's tokenizer files next to its weights.") from e


def surfaces(tokenizer) -> list[bytes | None]:
    """What each id stands for as bytes; added tokens are literal text (their content, UTF-8)."""
    from fusionlab.align.vocab import token_bytes

    out = list(token_bytes(tokenizer))
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if 0 <= i < len(out) and not getattr(tok, "special", False):
            out[i] = tok.content.encode("utf-8")
    return out


def _index(surf: Sequence[bytes | None], rows: int) -> dict[bytes, int]:
    """surface -> the first id (< rows) spelling it."""
    index: dict[bytes, int] = {}
    for i, s in enumerate(surf[:rows]):
        if s:
            index.setdefault(s, i)
    return index


def pieces(surface: bytes, index: Mapping[bytes, int], longest: int) -> list[int]:
    """Greedy longest-match split of ``surface`` into ids of ``index`` (bytes no token spells are skipped)."""
    out, i = [], 0
    while i < len(surface):
        for j in range(min(len(surface), i + longest), i, -1):
            tid = index.get(surface[i:j])
            if tid is not None:
                out.append(tid)
                i = j
                break
        else:
            i += 1
    return out


def _as_added(surface: bytes, special: Any | None) -> Any | None:
    """The AddedToken that spells ``surface`` (a special keeps its settings); None if it is not text."""
    from tokenizers import AddedToken

    if special is not None:
        return special
    try:
        return AddedToken(surface.decode("utf-8"), normalized=False, special=False)
    except UnicodeDecodeError:
        return None  # a partial UTF-8 byte token cannot be an added token


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Side:
    """One model whose rows take part: an input (its reader is wrapped) or a weights-carrying tokenizer source."""

    label: str
    reader: CheckpointReader  # the unwrapped reader
    tokenizer: Any
    rows: int  # its embedding rows
    hidden: int
    perm: torch.Tensor  # (output size,) its id of each output token, -1: it lacks it
    index: dict[bytes, int]


@dataclass
class Vocabulary:
    """The output vocabulary of a merge and how each input's token-indexed rows are made in it."""

    config: TokenizerConfig
    tokenizer: Any
    source_dir: Path | None  # copy these tokenizer files (an unmodified source tokenizer), else save_pretrained
    size: int
    surfaces: list[bytes | None]
    sides: list[Side]  # the inputs, in the engine's order
    donors: list[Side]  # every model that can lend rows: the inputs, then the source model (weights only)
    entries: dict[int, tuple[TokenEmbedding, Side | None]]  # output id -> its tokens entry (and the model named)
    hidden: int
    stats: dict[str, int] = field(default_factory=dict)
    _recipes: dict[int, Any] = field(default_factory=dict)
    _heads: dict[int, torch.Tensor] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- rows
    def head(self, side: Side) -> torch.Tensor:
        """The side's output embedding (lm_head, or the tied input embedding), fp32, memoised."""
        key = id(side)
        if key not in self._heads:
            name = next((n for n in LM_HEAD_NAMES + EMBED_NAMES if side.reader.resolve_name(n)), None)
            if name is None:
                name = next(n for n in side.reader.names if is_embedding(n))
            self._heads[key] = side.reader.get(name).clone()
        return self._heads[key]

    def _alignment(self, donor: Side, side: Side):
        """EVA's projection of ``donor``'s vocabulary onto ``side``'s (cached on disk like the ensemble's)."""
        from fusionlab.align import align
        from fusionlab.models.embedded import cache_dir

        return align(_Head(self.head(donor)), donor.tokenizer, _Head(self.head(side)), side.tokenizer,
                     cache_dir=cache_dir() / "align", aux_eos_ids=sorted(_eos_ids(donor)))

    def recipe(self, k: int) -> "RowRecipe":
        """How input ``k``'s rows are made (built once; the alignments it needs are built here)."""
        if k in self._recipes:
            return self._recipes[k]
        side, fill = self.sides[k], self.config.fill
        forced = {t for t, (e, _) in self.entries.items() if e.force}
        missing = [int(t) for t in (side.perm < 0).nonzero()[:, 0]]
        missing += sorted(forced - set(missing))
        combos: dict[int, tuple[list[int], list[float]]] = {}
        copies: dict[int, tuple[Side, int]] = {}
        means: list[int] = []
        zeros: list[int] = []
        counts = dict.fromkeys(("entry", "aligned", "pieces", "donor", "mean", "zero", "padding"), 0)
        counts["exact"] = int((side.perm >= 0).sum()) - len(forced & set(int(t) for t in (side.perm >= 0).nonzero()[:, 0]))
        projections: dict[int, Any] = {}
        longest = max((len(s) for s in side.index), default=1)
        for t in missing:
            entry, named = self.entries.get(t, (None, None))
            surface = self.surfaces[t]
            if entry is not None and entry.source is not None:
                counts["entry"] += 1
                if entry.source == "zero":
                    zeros.append(t)
                else:
                    copies[t] = (named, _entry_row(entry, named, surface))
                continue
            if surface is None:  # a padding id of the output vocabulary
                counts["padding"] += 1
                means.append(t)
                continue
            if fill in ("zero", "mean"):
                counts[fill] += 1
                (zeros if fill == "zero" else means).append(t)
                continue
            donor = next((d for d in self.donors if d is not side and d.perm[t] >= 0), None)
            if fill == "donor":
                if donor is None or donor.hidden != side.hidden:
                    raise FusionlabError(f"merge.tokenizer.fill=donor: no model of hidden size {side.hidden} has the "
                                         f"token {surface!r} that {side.label} lacks; use fill=alignment.")
                counts["donor"] += 1
                copies[t] = (donor, int(donor.perm[t]))
                continue
            if donor is not None:
                if id(donor) not in projections:
                    projections[id(donor)] = self._alignment(donor, side)
                s = projections[id(donor)]
                cols, vals = s.cols[int(donor.perm[t])], s.vals[int(donor.perm[t])]
                keep = (cols >= 0) & (vals > 0)
                if bool(keep.any()):
                    counts["aligned"] += 1
                    combos[t] = (cols[keep].tolist(), vals[keep].tolist())
                    continue
            ids = pieces(surface, side.index, longest)
            if ids:
                counts["pieces"] += 1
                combos[t] = (ids, [1.0] * len(ids))
            else:  # no byte of the token is spelled by this input: the last resort, counted
                counts["mean"] += 1
                means.append(t)
        self.stats.update({f"vocab/{k}/{name}": v for name, v in counts.items() if v})
        log.info("%s in the output vocabulary: %s", side.label, counts)
        self._recipes[k] = RowRecipe.build(side.perm, combos, means, copies, zeros)
        return self._recipes[k]

    # ----------------------------------------------------------------------------- output
    def save(self, out_dir: Path) -> None:
        """Write the output tokenizer into a merged checkpoint and point its configs at its size and special ids."""
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        if self.source_dir is not None:
            import shutil

            for name in TOKENIZER_FILES:
                if (self.source_dir / name).exists():
                    shutil.copy2(self.source_dir / name, out_dir / name)
        else:
            self.tokenizer.save_pretrained(str(out_dir))
        ids = {f"{role}_token_id": getattr(self.tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad")}
        ids = {k: v for k, v in ids.items() if v is not None}
        for name, updates in (("config.json", {"vocab_size": self.size, **ids}), ("generation_config.json", ids)):
            path = out_dir / name
            if path.exists():
                cfg = json.loads(path.read_text())
                cfg.update({k: v for k, v in updates.items() if k in cfg or k == "vocab_size"})
                path.write_text(json.dumps(cfg, indent=2) + "\n")
        (out_dir / "fusionlab_vocabulary.json").write_text(json.dumps(
            {"source": self.config.source, "fill": self.config.fill, "size": self.size, **self.stats}, indent=2) + "\n")


@dataclass
class RowRecipe:
    """An input's rows in the output vocabulary: gather by ``perm``, then overwrite the filled ones."""

    perm: torch.Tensor  # (size,) own id of each output id (0 where filled below)
    ids: torch.Tensor  # (n,) output ids made as weighted means of own rows
    cols: torch.Tensor  # (n, width) those own rows, -1 padding
    vals: torch.Tensor  # (n, width) their weights (0 padding)
    means: torch.Tensor  # output ids set to the mean own row (padding ids, fill=mean, the last resort)
    copies: dict[int, tuple[Side, int]]  # output id -> (a model, its id): tokens entries, fill=donor
    zeros: list[int]  # output ids set to zero (fill=zero, source: zero entries)

    @classmethod
    def build(cls, perm: torch.Tensor, combos: Mapping[int, tuple[list[int], list[float]]], means: list[int],
              copies: dict[int, tuple[Side, int]], zeros: list[int]) -> "RowRecipe":
        width = max((len(c) for c, _ in combos.values()), default=1)
        cols = torch.full((len(combos), width), -1, dtype=torch.long)
        vals = torch.zeros(len(combos), width)
        for r, (c, w) in enumerate(combos.values()):
            cols[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            vals[r, :len(w)] = torch.tensor(w)
        vals = vals / vals.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return cls(perm.clamp_min(0), torch.tensor(list(combos), dtype=torch.long), cols, vals,
                   torch.tensor(means, dtype=torch.long), copies, zeros)

    def apply(self, t: torch.Tensor, name: str, block: int = 8192) -> torch.Tensor:
        """``t`` (own rows × hidden) → (output size × hidden). A filled row is the weighted mean of its own rows,
        rescaled to their weighted mean norm (a plain mean of k distinct rows would shrink towards zero)."""
        out = t.index_select(0, self.perm)
        for start in range(0, len(self.ids), block):
            cols, vals = self.cols[start:start + block], self.vals[start:start + block].to(t.dtype)
            rows = t[cols.clamp_min(0)]  # (b, width, hidden)
            mean = torch.einsum("bw,bwh->bh", vals, rows)
            norm = (vals * rows.norm(dim=2)).sum(dim=1)
            out[self.ids[start:start + block]] = mean * (norm / mean.norm(dim=1).clamp_min(1e-12))[:, None]
        if len(self.means):
            out[self.means] = t.mean(dim=0)
        for other in {id(o): o for o, _ in self.copies.values()}.values():
            rows = [(tid, row) for tid, (o, row) in self.copies.items() if o is other]
            out[[tid for tid, _ in rows]] = other.reader.get(name)[[row for _, row in rows]].to(t.dtype)
        if self.zeros:
            out[self.zeros] = 0
        return out


def _entry_row(entry: TokenEmbedding, named: Side, surface: bytes | None) -> int:
    if entry.token_id is not None:
        row = entry.token_id
    elif entry.token is not None:
        row = named.index.get(entry.token.encode("utf-8"), named.tokenizer.get_vocab().get(entry.token, -1))
    else:
        row = named.index.get(surface, -1) if surface is not None else -1
    if not 0 <= row < named.rows:
        what = entry.token if entry.token is not None else (entry.token_id if entry.token_id is not None else surface)
        raise FusionlabError(f"merge.tokenizer.tokens: model {named.label} has no token {what!r} to take a row from.")
    return row


def _eos_ids(side: Side) -> set[int]:
    """The ids that end a turn (generation config + tokenizer), sent to the other model's EOS as EVA does."""
    ids = {side.tokenizer.eos_token_id}
    gen = Path(side.reader.dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return {int(i) for i in ids if i is not None}


class _Head(torch.nn.Module):
    """A checkpoint's output embedding matrix, as :func:`fusionlab.align.align` reads models (no full model load)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Embedding.from_pretrained(weight, freeze=True)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


class VocabularyView:
    """An input's reader whose token-indexed tensors come in the output vocabulary (everything else passes through)."""

    def __init__(self, vocabulary: Vocabulary, k: int):
        self._vocab, self._k = vocabulary, k
        self._reader = vocabulary.sides[k].reader
        self.shape = {n: ((vocabulary.size, *s[1:]) if is_embedding(n) else s) for n, s in self._reader.shape.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        stored = self._reader.resolve_name(name)
        if stored is None or not is_embedding(stored):
            return self._reader.get(name, device, dtype)
        t = self._vocab.recipe(self._k).apply(self._reader.get(name), name)
        return (t.to(dtype) if dtype is not None else t).to(device)


def _rows_of(reader: CheckpointReader) -> tuple[int, int]:
    """(vocabulary rows, hidden size) of a checkpoint's input embedding."""
    name = next((n for n in reader.names if is_embedding(n)), None)
    if name is None:
        raise FusionlabError(f"{reader.label} has no embedding tensor ({', '.join(EMBED_NAMES[:2])}, ...); "
                             "merging across tokenizers maps its rows.")
    return reader.shape[name][0], reader.shape[name][1]


def _forget(tokenizer) -> None:
    """Drop fusionlab.align's memos on a tokenizer whose vocabulary was just changed (token bytes, hash)."""
    for key in ("_fusionlab_token_bytes", "_fusionlab_hash"):
        tokenizer.__dict__.pop(key, None)


def _output_tokenizer(tc: TokenizerConfig, inputs: Sequence[Any], tokenizers: list, src_dir: Path | None):
    """(the output tokenizer, the dir to copy its files from or None when it was changed)."""
    if src_dir is None:
        out_tok, source_dir = tokenizers[0], inputs[0].reader.dir
    else:
        out_tok, source_dir = load_tokenizer(src_dir, f"tokenizer source {tc.source!r}"), src_dir
    known = {s for s in surfaces(out_tok) if s}
    new_tokens = [t for t in tc.tokens if t not in out_tok.get_vocab() and t.encode("utf-8") not in known]
    if tc.source != "union" and not new_tokens:
        return out_tok, source_dir
    out_tok = load_tokenizer(source_dir, "the output tokenizer")  # a fresh copy to extend
    plain, special, skipped = [], [], 0
    if tc.source == "union":
        for k, tok in enumerate(tokenizers[1:], 1):
            specials = {i: t for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
            for i, s in enumerate(surfaces(tok)[:_rows_of(inputs[k].reader)[0]]):
                if s and s not in known:
                    added = _as_added(s, specials.get(i))
                    if added is None:
                        skipped += 1
                        continue
                    known.add(s)
                    (special if i in specials else plain).append(added)
    plain += [_as_added(t.encode("utf-8"), None) for t in new_tokens]  # mergekit adds the tokens its section names
    if plain:  # in one call each: the tokenizer rebuilds its added-token matcher per call
        out_tok.add_tokens(plain)
    if special:
        out_tok.add_tokens(special, special_tokens=True)
    if skipped:
        log.info("union tokenizer: %d byte tokens that are not text were left out", skipped)
    _forget(out_tok)
    return out_tok, None


def plan_vocabulary(tc: TokenizerConfig | None, inputs: Sequence[Any], derived: Mapping[str, str | Path] | None = None
                    ) -> Vocabulary | None:
    """Build the output vocabulary of a merge and wrap each input's reader in a :class:`VocabularyView`
    (``inputs``: the engine's ``MergeInput`` list, reference first). None when there is no tokenizer plan or
    every input already has the output tokenizer (the engine then copies it as before)."""
    from fusionlab.align.vocab import tokenizer_hash
    from fusionlab.models.resolve import resolve_checkpoint

    if tc is None or not inputs:
        return None
    src_ref = source_model(tc.source)
    src_path = Path(resolve_checkpoint(src_ref, derived, what="Tokenizer source")) if src_ref else None
    src_dir = (src_path if src_path.is_dir() else src_path.parent) if src_path is not None else None
    tokenizers = [load_tokenizer(i.reader.dir, i.label) for i in inputs]
    out_tok, source_dir = _output_tokenizer(tc, inputs, tokenizers, src_dir)
    ref_rows, hidden = _rows_of(inputs[0].reader)
    src_weights = src_dir is not None and any(src_dir.glob("*.safetensors"))
    size = len(out_tok)
    if tc.source == "base" or (src_dir is not None and src_dir.resolve() == Path(inputs[0].reader.dir).resolve()):
        size = max(size, ref_rows)  # keep the reference's padding rows
    elif src_weights:
        size = max(size, _rows_of(CheckpointReader(src_path, f"tokenizer source {tc.source!r}"))[0])
    if tc.pad_to_multiple_of:
        size = -(-size // tc.pad_to_multiple_of) * tc.pad_to_multiple_of
    out_surf = surfaces(out_tok)[:size]
    out_surf += [None] * (size - len(out_surf))
    out_hash = tokenizer_hash(out_tok)

    def side(label: str, reader: CheckpointReader, tok) -> Side:
        rows, dim = _rows_of(reader)
        index = _index(surfaces(tok), rows)
        if tokenizer_hash(tok) == out_hash and rows == size:
            return Side(label, reader, tok, rows, dim, torch.arange(size), index)
        perm = torch.tensor([index.get(s, -1) if s else -1 for s in out_surf], dtype=torch.long)
        return Side(label, reader, tok, rows, dim, perm, index)

    sides = [side(i.label, i.reader, t) for i, t in zip(inputs, tokenizers)]
    donors = list(sides)
    if src_weights and not any(Path(s.reader.dir).resolve() == src_dir.resolve() for s in sides):
        label = f"tokenizer source {tc.source!r}"
        donors.append(side(label, CheckpointReader(src_path, label), out_tok))
    by_dir = {Path(d.reader.dir).resolve(): d for d in reversed(donors)}
    vocab, out_index = out_tok.get_vocab(), _index(out_surf, size)
    entries: dict[int, tuple[TokenEmbedding, Side | None]] = {}
    for t, e in tc.tokens.items():
        tid = vocab.get(t, out_index.get(t.encode("utf-8"), -1))
        named = None
        if e.source not in (None, "zero"):
            path = Path(resolve_checkpoint(e.source, derived)).resolve()
            named = by_dir.get(path if path.is_dir() else path.parent)
            if named is None:
                raise FusionlabError(f"merge.tokenizer.tokens[{t!r}].source={e.source!r} is none of the merged models "
                                     "(nor the tokenizer source); name one of them.")
            if named.hidden != hidden:
                raise FusionlabError(f"merge.tokenizer.tokens[{t!r}].source={e.source!r} has hidden size "
                                     f"{named.hidden}, the merged models {hidden}.")
            _entry_row(e, named, out_surf[tid] if tid >= 0 else None)  # a missing token fails here, not mid-merge
        entries[tid] = (e, named)
    identity = torch.arange(size)
    if source_dir is not None and not entries and all(s.rows == size and bool((s.perm == identity).all()) for s in sides):
        return None
    vocabulary = Vocabulary(tc, out_tok, source_dir, size, out_surf, sides, donors, entries, hidden,
                            stats={"vocab/size": size})
    for k, inp in enumerate(inputs):
        inp.reader = VocabularyView(vocabulary, k)
    return vocabulary


@dataclass
class _Input:
    label: str
    reader: Any


def transplant(model: str | Path, tokenizer_source: str, output: str | Path, *, fill: str = "mean",
               dtype: str = "auto", overwrite: bool = False, derived: Mapping[str, str | Path] | None = None
               ) -> dict[str, Any]:
    """mergekit's ``tokensurgeon``: ``model`` on another tokenizer (``model:<ref>``; its model's weights, when
    there, lend their alignment), every row it lacks filled as in a merge (``fill``). Returns the row counts.

    The default fill is ``mean``, not ``alignment`` as in merges: measured on SmolLM2 → Gemma-3's 262,144-token
    tokenizer (experiments/merge/RESULTS.md) the alignment fill gives perplexity 2.6e6 against 137 for mean
    and 261 for zero — with a tied head, ~216k rows that each resemble a real token compete with it for
    the probability mass (likely cause, not verified)."""
    from fusionlab.io import atomic_dir, check_output_path
    from fusionlab.merge.io import ST_DTYPES, ShardWriter, copy_aux_files
    from fusionlab.models.resolve import resolve_checkpoint, torch_dtype

    check_source(tokenizer_source, "tokensurgeon.tokenizer")
    if source_model(tokenizer_source) is None:
        raise FusionlabError(f"tokensurgeon.tokenizer={tokenizer_source!r}: give the tokenizer to move onto, "
                             "model:<dir | embedded name>.")
    check_output_path(output, overwrite, key="tokensurgeon.output")  # before any tokenizer or tensor is read
    tc = TokenizerConfig(source=tokenizer_source, fill=fill)
    out_dtype = None if dtype == "auto" else torch_dtype(dtype, "tokensurgeon.dtype")
    inp = _Input(f"model {str(model)!r}", CheckpointReader(resolve_checkpoint(str(model), derived), f"model {model!r}"))
    vocabulary = plan_vocabulary(tc, [inp], derived)
    r = inp.reader
    entries = []
    for name in r.names:
        stored = ST_DTYPES[r.dtype[name]]
        entries.append((name, r.shape[name], (out_dtype or stored) if stored.is_floating_point else stored))
    with atomic_dir(output, overwrite=overwrite) as tmp:
        w = ShardWriter(tmp, entries, metadata={"fusionlab": "tokensurgeon", "tokenizer": tokenizer_source})
        try:
            for name, _, dt in entries:
                w.write(name, r.get(name, dtype=None if not dt.is_floating_point else torch.float32).to(dt))
                r.release(name)
            w.finish()
        finally:
            w.close()
            r.close()
        copy_aux_files(Path(r.dir), tmp)
        if vocabulary is not None:
            vocabulary.save(tmp)
    return {"tokensurgeon_vocab": vocabulary.size if vocabulary else entries[0][1][0],
            **(vocabulary.stats if vocabulary else {}), "tokensurgeon_output": str(output)}


@dataclass
class TokenSurgeonConfig:
    """The ``tokensurgeon:`` node (job ``tokensurgeon``, conf/experiment/tokensurgeon.yaml): ``model`` moved onto
    ``tokenizer`` (model:<ref>), its rows made as in a merge across tokenizers (``fill``)."""

    model: str  # a dir, an embedded name
    tokenizer: str  # model:<ref>: the tokenizer to move onto (its model's weights, when there, lend the alignment)
    output: str | None = None  # default: <run dir>/transplanted
    fill: str = "mean"  # mean | zero | alignment (rows the model lacks; alignment measured far worse here: transplant)
    dtype: str = "auto"
    overwrite: bool = False
    eval: PerplexityEval | None = None  # perplexity of the model and the transplant (each with its own tokenizer)

    def __post_init__(self) -> None:
        from fusionlab.merge.config import build
        from fusionlab.models.resolve import torch_dtype

        check_source(self.tokenizer, "tokensurgeon.tokenizer")
        if source_model(self.tokenizer) is None:
            raise FusionlabError(f"tokensurgeon.tokenizer={self.tokenizer!r}: give the tokenizer to move onto, "
                                 "model:<dir | embedded name>.")
        if self.fill not in FILLS or self.fill == "donor":
            raise FusionlabError(f"tokensurgeon.fill={self.fill!r}: use alignment, mean or zero.")
        if self.dtype != "auto":
            torch_dtype(self.dtype, "tokensurgeon.dtype")
        if not _ref_exists(self.model):
            raise FusionlabError(f"tokensurgeon.model={self.model!r} does not exist; give a checkpoint dir or an "
                                 "embedded model name.")
        self.eval = build(PerplexityEval, self.eval, "tokensurgeon.eval") if self.eval is not None else None
