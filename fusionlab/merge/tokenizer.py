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
from fusionlab.io import read_json_object
from fusionlab.merge.derive import PerplexityEval
from fusionlab.merge.io import AUX_FILES, EMBED_NAMES, LM_HEAD_NAMES, CheckpointReader, is_embedding, is_input_embedding
from fusionlab.models.resolve import DERIVED_PREFIX

log = logging.getLogger(__name__)

MODEL_PREFIX = "model:"
FILLS = ("alignment", "donor", "mean", "omp", "zero")  # how a row an input lacks is made (alignment: fusionlab's)
OMP_K = 64  # fill=omp: anchors per new token; mergekit 0.1.5 tokensurgeon's default (-k 64, scripts/tokensurgeon.py)
# fill=omp's search pool per token (atoms of largest |<y, atom>|). A pool of 4k alone is too small for small k: at
# k = 4 (16 atoms) OMP on SmolLM2 -> Gemma-3 picked near-collinear anchors with coefficients up to 6.8 and rows up
# to 10x the usual norm (perplexity 2.7e61), where mergekit's exact search and a 256-atom pool keep |c| <= 1.0
# (/tmp probe, donor-space geometry only, no held-out text; experiments/merge/RESULTS.md).
OMP_POOL = 256
HEAD_FILLS = ("mean",)  # transplant head_fill: the output rows of the tokens the model lacks (untied head)
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
    fill: str = "alignment"  # rows an input lacks: alignment (EVA projection, else pieces) | donor | mean | omp | zero
    omp_k: int = OMP_K  # fill=omp: anchor tokens per row (mergekit's -k default)

    def __post_init__(self) -> None:
        check_source(self.source, "merge.tokenizer.source")
        if self.fill not in FILLS:
            raise FusionlabError(f"merge.tokenizer.fill={self.fill!r}: use one of {list(FILLS)}.")
        if isinstance(self.omp_k, bool) or not isinstance(self.omp_k, int) or self.omp_k < 1:
            raise FusionlabError(f"merge.tokenizer.omp_k={self.omp_k!r}: use an integer >= 1 (default {OMP_K}, "
                                 "mergekit's tokensurgeon -k).")
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
# The tokenizers :class:`JsonTokenizer` reads itself: verified (tests/merge/test_tokenizer_merge.py,
# test_json_tokenizer_is_transformers_tokenizer) to give what ``AutoTokenizer`` gives — the same vocabulary, added
# tokens, special ids and roles, and byte-identical files after the same added tokens — for these tokenizer classes
# and model types. Anything else (another class or model type, a key that changes how transformers builds the
# tokenizer, extra tokenizer files) goes through transformers as before.
JSON_TOKENIZER_CLASSES = ("TokenizersBackend", "GemmaTokenizer")
JSON_TOKENIZER_MODEL_TYPES = ("llama", "gemma3_text")
_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_JSON_CONFIG_KEYS = {f"{r}_token" for r in _ROLES} | {"backend", "tokenizer_class", "extra_special_tokens", "is_local",
                                                       "local_files_only", "model_max_length"}
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")  # the files such a tokenizer has


class JsonTokenizer:
    """A transformers-saved fast tokenizer read straight from its ``tokenizer.json`` with the ``tokenizers`` library
    (tens of ms; no ``import transformers``, whose import and per-model-type config modules cost 1–2 s per process
    on this VM: experiments/merge/RESULTS.md, union-merge profile). It offers what the merge and
    :mod:`fusionlab.align` read from a tokenizer (``get_vocab``, ``len``, ``added_tokens_decoder``,
    ``all_special_ids``, ``<role>_token_id``, ``backend_tokenizer``), ``add_tokens``, and :meth:`save_files`, which
    writes what ``save_pretrained`` writes for such a tokenizer. :meth:`read` returns None where that is not known
    to hold (:data:`JSON_TOKENIZER_CLASSES`, :data:`JSON_TOKENIZER_MODEL_TYPES`): then transformers loads it."""

    def __init__(self, path: Path, backend: Any, config: dict[str, Any], specials: dict[str, str]):
        self.name_or_path = str(path)
        self.dir = path
        self.backend_tokenizer = backend
        self._config = config
        self._specials = specials  # role ("bos", ..., "extra<i>") -> token text
        self._vocab: dict[str, int] | None = None
        self._added: dict[int, Any] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> "JsonTokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").is_file() or not (path / "tokenizer_config.json").is_file():
            return None
        if any((path / f).exists() for f in TOKENIZER_FILES if f not in _JSON_FILES):
            return None
        try:
            config = json.loads((path / "tokenizer_config.json").read_text())
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
        if (not isinstance(config, dict) or set(config) - _JSON_CONFIG_KEYS or config.get("backend") != "tokenizers"
                or "model_max_length" not in config or config.get("tokenizer_class") not in JSON_TOKENIZER_CLASSES
                or model_type not in JSON_TOKENIZER_MODEL_TYPES):
            return None
        specials = {role: config[f"{role}_token"] for role in _ROLES if config.get(f"{role}_token") is not None}
        extra = config.get("extra_special_tokens", [])
        if not isinstance(extra, list):
            return None
        specials.update({f"extra{i}": t for i, t in enumerate(extra)})
        if not all(isinstance(t, str) for t in specials.values()):
            return None  # AddedToken dicts: transformers rewrites them; not reproduced here
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - a file tokenizers cannot read: transformers reports it
            return None
        if any(backend.token_to_id(t) is None for t in specials.values()):
            return None  # transformers would add the token: not the file's vocabulary any more
        return cls(path, backend, config, specials)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.backend_tokenizer.get_vocab(with_added_tokens=True)
        return dict(self._vocab)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        if self._added is None:
            self._added = dict(sorted(self.backend_tokenizer.get_added_tokens_decoder().items()))
        return dict(self._added)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend_tokenizer.token_to_id(t) for t in dict.fromkeys(self._specials.values())]

    def __getattr__(self, name: str) -> Any:
        role, _, what = name.partition("_token")
        if role in _ROLES and what in ("", "_id"):
            text = self._specials.get(role)
            return text if what == "" or text is None else self.backend_tokenizer.token_to_id(text)
        raise AttributeError(name)

    def add_tokens(self, tokens: Sequence[Any], special_tokens: bool = False) -> int:
        """As transformers' ``add_tokens`` (the same calls on the same backend); returns the number added."""
        before = len(self)
        if special_tokens:
            self.backend_tokenizer.add_special_tokens(list(tokens))
        else:
            self.backend_tokenizer.add_tokens(list(tokens))
        self._vocab = self._added = None
        return len(self) - before

    def save_files(self, out_dir: str | os.PathLike) -> None:
        """What ``save_pretrained`` writes for this tokenizer: tokenizer.json, and the dir's config and chat template."""
        import shutil

        out_dir = Path(out_dir)
        self.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
        config = {**self._config, "is_local": True, "local_files_only": False}  # as a tokenizer read from a dir
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
                                                       + "\n", encoding="utf-8")
        if (self.dir / "chat_template.jinja").exists():
            shutil.copyfile(self.dir / "chat_template.jinja", out_dir / "chat_template.jinja")


def load_tokenizer(path: str | os.PathLike, label: str):
    """A merge input's tokenizer: a :class:`JsonTokenizer` where that is exactly transformers' tokenizer, else
    ``AutoTokenizer``."""
    fast = JsonTokenizer.read(path)
    if fast is not None:
        return fast
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


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int = 64, candidates: int | None = None, block: int = 256
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit, batched: each row ``y`` of ``targets`` (n, d) as a ``k``-sparse combination
    of rows of ``atoms`` (N, d). Step t adds the atom with the largest ``|<residual, atom>|`` (mergekit's rule:
    atoms are not normalised) and refits all chosen atoms by least squares (incremental Cholesky of their
    Gram matrix); an atom in the span of those already chosen gets coefficient 0.
    Returns (atom ids (n, k) long, coefficients (n, k) float32): ``y ≈ coef @ atoms[ids]``.

    The search runs over each target's ``candidates`` atoms of largest ``|<y, atom>|`` (default max(4k, 256); >= N: all
    atoms, which is exact OMP, mergekit's ``batch_omp``): exact OMP scores every atom at every
    step, k full (n × N) products; the pool makes it one product plus a (candidates × candidates) Gram matrix
    per target. Blocked over targets (``block`` at a time), float32, memory O(block · (N + candidates²))."""
    n, d = targets.shape
    N = atoms.shape[0]
    if k < 1 or k > N:
        raise FusionlabError(f"omp: k={k} must be in [1, {N}] (the number of anchor tokens).")
    m = min(N, max(4 * k, OMP_POOL) if candidates is None else candidates)
    if m < k:
        raise FusionlabError(f"omp: candidates={candidates} must be >= k={k}.")
    A = atoms.float()
    ids = torch.zeros(n, k, dtype=torch.long)
    coef = torch.zeros(n, k)
    for s in range(0, n, block):
        y = targets[s:s + block].float()
        b = y.shape[0]
        corr0 = y @ A.T  # (b, N)
        pool = corr0.abs().topk(m, dim=1).indices if m < N else torch.arange(N).expand(b, N)
        alpha = corr0.gather(1, pool)  # <y, a_j> over the pool
        del corr0
        pa = A[pool]  # (b, m, d)
        gram = pa @ pa.transpose(1, 2)  # (b, m, m)
        del pa
        cols = torch.zeros(b, m, k)  # gram columns of the chosen atoms
        chol = torch.zeros(b, k, k)
        sel = torch.zeros(b, k, dtype=torch.long)
        live = torch.zeros(b, k, dtype=torch.bool)  # chosen and independent of the earlier ones
        taken = torch.zeros(b, m, dtype=torch.bool)
        rows = torch.arange(b)
        corr = alpha.clone()
        c = torch.zeros(b, 0)
        for t in range(k):
            j = corr.abs().masked_fill(taken, -1.0).argmax(dim=1)
            taken[rows, j] = True
            sel[:, t] = j
            g = gram[rows, :, j]  # (b, m): <a_i, a_j>
            cols[:, :, t] = g
            gjj = g[rows, j]
            if t:
                w = torch.linalg.solve_triangular(chol[:, :t, :t], g.gather(1, sel[:, :t]).unsqueeze(-1),
                                                  upper=False).squeeze(-1)
                diag = gjj - (w * w).sum(dim=1)
            else:
                w, diag = torch.zeros(b, 0), gjj
            ok = diag > 1e-6 * gjj.clamp_min(1e-30)
            chol[:, t, :t] = w * ok[:, None]
            chol[:, t, t] = torch.where(ok, diag.clamp_min(1e-30).sqrt(), torch.ones(()))
            live[:, t] = ok
            rhs = (alpha.gather(1, sel[:, :t + 1]) * live[:, :t + 1]).unsqueeze(-1)
            c = torch.cholesky_solve(rhs, chol[:, :t + 1, :t + 1]).squeeze(-1) * live[:, :t + 1]
            corr = alpha - torch.bmm(cols[:, :, :t + 1], c.unsqueeze(-1)).squeeze(-1)
        ids[s:s + b] = pool.gather(1, sel)
        coef[s:s + b] = c
    return ids, coef


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
        missing = (side.perm < 0).nonzero()[:, 0].tolist()
        missing += sorted(forced - set(missing))
        combos: dict[int, tuple[list[int], list[float]]] = {}
        copies: dict[int, tuple[Side, int]] = {}
        means: list[int] = []
        zeros: list[int] = []
        counts = dict.fromkeys(("entry", "aligned", "omp", "pieces", "donor", "mean", "zero", "padding"), 0)
        omp_targets: dict[int, tuple[Side, list[int]]] = {}
        forced_had = [t for t in forced if 0 <= t < len(side.perm) and side.perm[t] >= 0]  # not a loop over the vocabulary
        counts["exact"] = int((side.perm >= 0).sum()) - len(forced_had)
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
            if fill == "omp" and donor is not None:
                counts["omp"] += 1
                omp_targets.setdefault(id(donor), (donor, []))[1].append(t)
                continue
            if fill == "donor":
                if donor is None or donor.hidden != side.hidden:
                    raise FusionlabError(f"merge.tokenizer.fill=donor: no model of hidden size {side.hidden} has the "
                                         f"token {surface!r} that {side.label} lacks; use fill=alignment.")
                counts["donor"] += 1
                copies[t] = (donor, int(donor.perm[t]))
                continue
            if donor is not None and fill == "alignment":
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
        sparse = [OmpFill.build(side, donor, ids, self.config.omp_k) for donor, ids in omp_targets.values()]
        self._recipes[k] = RowRecipe.build(side.perm, combos, means, copies, zeros, sparse)
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
        elif isinstance(self.tokenizer, JsonTokenizer):
            self.tokenizer.save_files(out_dir)
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
    sparse: list["OmpFill"] = field(default_factory=list)  # fill=omp: output ids made from anchor rows, per donor
    prefix: int = 0  # perm[:prefix] == 0..prefix-1 (those rows are one contiguous copy)
    identity: bool = False  # perm is 0..size-1 and nothing is filled: the input's tensor passes through

    @classmethod
    def build(cls, perm: torch.Tensor, combos: Mapping[int, tuple[list[int], list[float]]], means: list[int],
              copies: dict[int, tuple[Side, int]], zeros: list[int], sparse: Sequence["OmpFill"] = ()) -> "RowRecipe":
        width = max((len(c) for c, _ in combos.values()), default=1)
        cols = torch.full((len(combos), width), -1, dtype=torch.long)
        vals = torch.zeros(len(combos), width)
        for r, (c, w) in enumerate(combos.values()):
            cols[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            vals[r, :len(w)] = torch.tensor(w)
        vals = vals / vals.sum(dim=1, keepdim=True).clamp_min(1e-12)
        perm = perm.clamp_min(0)
        same = perm == torch.arange(len(perm))
        prefix = len(perm) if bool(same.all()) else int((~same).nonzero()[0, 0])
        identity = prefix == len(perm) and not (combos or means or copies or zeros or sparse)
        return cls(perm, torch.tensor(list(combos), dtype=torch.long), cols, vals,
                   torch.tensor(means, dtype=torch.long), copies, zeros, list(sparse), prefix, identity)

    def apply(self, t: torch.Tensor, name: str, block: int = 8192) -> torch.Tensor:
        """``t`` (own rows × hidden) → (output size × hidden). A filled row is the weighted mean of its own rows,
        rescaled to their weighted mean norm (a plain mean of k distinct rows would shrink towards zero)."""
        if self.identity and len(t) == len(self.perm):  # its own vocabulary, nothing filled: no copy
            return t
        n = min(self.prefix, len(t))  # output ids 0..n-1 are own ids 0..n-1: one copy, not a gather
        out = torch.empty((len(self.perm), *t.shape[1:]), dtype=t.dtype)
        out[:n] = t[:n]
        out[n:] = t.index_select(0, self.perm[n:])
        for start in range(0, len(self.ids), block):
            cols, vals = self.cols[start:start + block], self.vals[start:start + block].to(t.dtype)
            rows = t[cols.clamp_min(0)]  # (b, width, hidden)
            mean = torch.einsum("bw,bwh->bh", vals, rows)
            norm = (vals * rows.norm(dim=2)).sum(dim=1)
            out[self.ids[start:start + block]] = mean * (norm / mean.norm(dim=1).clamp_min(1e-12))[:, None]
        for fill in self.sparse:
            fill.apply(t, name, out, block)
        if len(self.means):
            out[self.means] = t.mean(dim=0)
        for other in {id(o): o for o, _ in self.copies.values()}.values():
            rows = [(tid, row) for tid, (o, row) in self.copies.items() if o is other]
            out[[tid for tid, _ in rows]] = other.reader.get(name)[[row for _, row in rows]].to(t.dtype)
        if self.zeros:
            out[self.zeros] = 0
        return out


def _donor_tensor(reader: CheckpointReader, name: str) -> str:
    """The donor's tensor that plays ``name``'s part: the same name (a tied lm_head: its embedding), else its
    lm_head / input embedding by role."""
    stored = reader.resolve_name(name)
    if stored is not None:
        return stored
    roles = LM_HEAD_NAMES + EMBED_NAMES if name in LM_HEAD_NAMES or name.endswith("lm_head.weight") else EMBED_NAMES
    found = next((reader.resolve_name(n) for n in roles if reader.resolve_name(n)), None)
    return found or next(n for n in reader.names if is_embedding(n))


@dataclass
class OmpFill:
    """fill=omp (mergekit's tokensurgeon ``-a omp``), the rows an input lacks that one donor has.

    The *anchors* are the tokens both spell (same bytes). For each new token, :func:`omp` writes the donor's row
    as a ``k``-sparse combination of the donor's anchor rows; the input's row is the same combination of its
    own anchor rows (no rescaling). Each token-indexed tensor uses the donor's tensor of the same role (the
    embedding's codes from the donor's embedding, an untied lm_head's from its lm_head, as mergekit does);
    the codes are computed once per donor tensor."""

    donor: Side
    ids: torch.Tensor  # (n,) output ids filled
    donor_ids: torch.Tensor  # (n,) the donor's ids of them
    own: torch.Tensor  # (a,) anchors: the input's ids
    anchors: torch.Tensor  # (a,) anchors: the donor's ids
    k: int
    _codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, side: Side, donor: Side, ids: list[int], k: int) -> "OmpFill":
        both = ((side.perm >= 0) & (donor.perm >= 0)).nonzero()[:, 0]
        d_ids, first = torch.unique(donor.perm[both], return_inverse=True)  # one anchor per donor row
        pos = torch.full((len(d_ids),), len(both), dtype=torch.long).scatter_reduce(0, first, torch.arange(len(both)), "amin")
        if len(d_ids) < k:
            raise FusionlabError(f"fill=omp: omp_k={k} but {side.label} and {donor.label} share only {len(d_ids)} "
                                 f"tokens (the anchors); use omp_k <= {len(d_ids)}.")
        t = torch.tensor(ids, dtype=torch.long)
        return cls(donor, t, donor.perm[t], side.perm[both[pos]], d_ids, k)

    def codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = _donor_tensor(self.donor.reader, name)
        if key not in self._codes:
            m = self.donor.reader.get(key)
            self._codes[key] = omp(m[self.donor_ids], m[self.anchors], self.k)
            log.info("fill=omp: %d rows from %s's %s (k=%d, %d anchors)", len(self.ids), self.donor.label, key,
                     self.k, len(self.anchors))
        return self._codes[key]

    def apply(self, t: torch.Tensor, name: str, out: torch.Tensor, block: int = 8192) -> None:
        idx, coef = self.codes(name)
        for s in range(0, len(self.ids), block):
            rows = t[self.own[idx[s:s + block]]]  # (b, k, hidden)
            out[self.ids[s:s + block]] = torch.einsum("bk,bkh->bh", coef[s:s + block].to(t.dtype), rows)


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
        eos = read_json_object(gen, "generation config").get("eos_token_id")
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

    def side(label: str, reader: CheckpointReader, tok) -> Side:
        rows, dim = _rows_of(reader)
        index = _index(surfaces(tok), rows)
        if rows == size and len(tok) == len(out_tok) and tokenizer_hash(tok) == tokenizer_hash(out_tok):
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


def transplant(model: str | Path, tokenizer_source: str, output: str | Path, *, fill: str = "omp",
               dtype: str = "auto", overwrite: bool = False, derived: Mapping[str, str | Path] | None = None,
               omp_k: int = OMP_K, head_fill: str | None = "mean") -> dict[str, Any]:
    """mergekit's ``tokensurgeon``: ``model`` on another tokenizer (``model:<ref>``; its model's weights, when
    there, lend their alignment), every row it lacks filled as in a merge (``fill``). Returns the row counts.

    Defaults ``fill=omp`` + ``head_fill=mean``, chosen on dev texts (experiments/merge/RESULTS.md, SmolLM2 →
    Gemma-3's 262,144-token tokenizer; test perplexity 113 vs 137 for the tied mean fill). With a tied head any
    informative fill fails (alignment: 2.6e6): the filled rows, as *output* rows, take 35–95% of the predicted
    mass (ablation in RESULTS.md); as input rows only they help.

    ``head_fill="mean"`` unties the head: the output rows of the tokens the model lacks are the mean of its
    output rows that the new vocabulary keeps, while the input rows follow ``fill``; a tied model gets an
    ``lm_head.weight`` of its own and ``tie_word_embeddings: false``."""
    from fusionlab.io import atomic_dir, check_not_an_input, check_output_path
    from fusionlab.merge.io import ST_DTYPES, ShardWriter, copy_aux_files
    from fusionlab.models.resolve import resolve_checkpoint, torch_dtype

    check_source(tokenizer_source, "tokensurgeon.tokenizer")
    if source_model(tokenizer_source) is None:
        raise FusionlabError(f"tokensurgeon.tokenizer={tokenizer_source!r}: give the tokenizer to move onto, "
                             "model:<dir | embedded name>.")
    if head_fill is not None and head_fill not in HEAD_FILLS:
        raise FusionlabError(f"tokensurgeon.head_fill={head_fill!r}: use null (the head follows fill) or one of "
                             f"{list(HEAD_FILLS)}.")
    check_output_path(output, overwrite, key="tokensurgeon.output")  # before any tokenizer or tensor is read
    tc = TokenizerConfig(source=tokenizer_source, fill=fill, omp_k=omp_k)
    out_dtype = None if dtype == "auto" else torch_dtype(dtype, "tokensurgeon.dtype")
    inp = _Input(f"model {str(model)!r}", CheckpointReader(resolve_checkpoint(str(model), derived), f"model {model!r}"))
    check_not_an_input(output, [(inp.label, inp.reader.dir)], key="tokensurgeon.output")
    vocabulary = plan_vocabulary(tc, [inp], derived)
    r = inp.reader
    entries = []
    for name in r.names:
        stored = ST_DTYPES[r.dtype[name]]
        entries.append((name, r.shape[name], (out_dtype or stored) if stored.is_floating_point else stored))
    head = untie = None
    if head_fill is not None and vocabulary is not None:
        head = next((n for n in r.names if n in LM_HEAD_NAMES or n.endswith("lm_head.weight")), None)
        if head is None:  # tied: the head is the input embedding; write it as a tensor of its own
            embed = next(n for n in r.names if is_embedding(n))
            untie = "lm_head.weight"
            entries.append((untie, r.shape[embed], next(dt for n, _, dt in entries if n == embed)))
    lacking = (vocabulary.sides[0].perm < 0) if vocabulary is not None else None

    def head_rows(t: torch.Tensor) -> torch.Tensor:  # head_fill=mean: the rows the model lacks = the kept rows' mean
        t = t.clone()
        t[lacking] = t[~lacking].mean(dim=0)
        return t

    with atomic_dir(output, overwrite=overwrite) as tmp:
        w = ShardWriter(tmp, entries, metadata={"fusionlab": "tokensurgeon", "tokenizer": tokenizer_source})
        try:
            tied_head = None
            for name, _, dt in entries:
                if name == untie:  # appended last: the input embedding was read above
                    w.write(name, tied_head)
                    continue
                t = r.get(name, dtype=None if not dt.is_floating_point else torch.float32)
                if untie is not None and is_input_embedding(name):
                    tied_head = head_rows(t).to(dt)
                w.write(name, (head_rows(t) if name == head else t).to(dt))
                r.release(name)
            w.finish()
        finally:
            w.close()
            r.close()
        copy_aux_files(Path(r.dir), tmp)
        if vocabulary is not None:
            vocabulary.save(tmp)
        if untie is not None:
            path = tmp / "config.json"
            cfg = json.loads(path.read_text())
            cfg["tie_word_embeddings"] = False
            path.write_text(json.dumps(cfg, indent=2) + "\n")
    return {"tokensurgeon_vocab": vocabulary.size if vocabulary else entries[0][1][0],
            **(vocabulary.stats if vocabulary else {}), "tokensurgeon_output": str(output)}


@dataclass
class TokenSurgeonConfig:
    """The ``tokensurgeon:`` node (job ``tokensurgeon``, conf/experiment/tokensurgeon.yaml): ``model`` moved onto
    ``tokenizer`` (model:<ref>), its rows made as in a merge across tokenizers (``fill``)."""

    model: str  # a dir, an embedded name
    tokenizer: str  # model:<ref>: the tokenizer to move onto (its model's weights, when there, lend the alignment)
    output: str | None = None  # default: <run dir>/transplanted
    fill: str = "omp"  # omp | alignment | mean | zero: the input rows of the tokens the model lacks (chosen on dev texts)
    omp_k: int = OMP_K  # fill=omp: anchor tokens per row (mergekit's tokensurgeon -k default)
    head_fill: str | None = "mean"  # mean: untie the head, the lacking tokens' output rows = the mean row (null: = fill)
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
            raise FusionlabError(f"tokensurgeon.fill={self.fill!r}: use alignment, mean, omp or zero.")
        if isinstance(self.omp_k, bool) or not isinstance(self.omp_k, int) or self.omp_k < 1:
            raise FusionlabError(f"tokensurgeon.omp_k={self.omp_k!r}: use an integer >= 1 (default {OMP_K}).")
        if self.head_fill is not None and self.head_fill not in HEAD_FILLS:
            raise FusionlabError(f"tokensurgeon.head_fill={self.head_fill!r}: use null (the head follows fill) or one "
                                 f"of {list(HEAD_FILLS)}.")
        if self.dtype != "auto":
            torch_dtype(self.dtype, "tokensurgeon.dtype")
        if not _ref_exists(self.model):
            raise FusionlabError(f"tokensurgeon.model={self.model!r} does not exist; give a checkpoint dir or an "
                                 "embedded model name.")
        self.eval = build(PerplexityEval, self.eval, "tokensurgeon.eval") if self.eval is not None else None
