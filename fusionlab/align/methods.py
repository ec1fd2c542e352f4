"""EVA vocabulary alignment methods: one registered function per method, options read from its signature.

Each method maps ``(aux_model, aux_tokenizer, main_model, main_tokenizer, *, options...)`` to an
:class:`Alignment` (aux vocab -> main vocab). :func:`align_method` registers it and builds its
options dataclass from the keyword-only parameters (name, type and default, written once, in the
signature) on top of :class:`AlignOptions`, the options :func:`align` itself reads. That dataclass
types the method's ``conf/align_method/<name>.yaml`` (registered in Hydra's ConfigStore as
``<name>_schema`` by :mod:`fusionlab.schema`), so an unknown option or a value of the wrong type
fails at compose time and a bad value in ``__post_init__`` (:data:`OPTION_CHECKS`).

Adding a method = one decorated function here + its YAML (``defaults: [<name>_schema, _self_]``).
:func:`align` adds what every method shares: special tokens mapped by role, the held-out P@1
figure, timing and the on-disk cache.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fusionlab.align.alignment import Alignment, cache_key, cached, embeddings_hash, output_embeddings
from fusionlab.align.vecmap import SEARCH_DTYPES, csls_topk, supervised_map, usable_cores
from fusionlab.align.vocab import (ROLES, nearest_by_edit_distance, seed_dictionary, special_ids, special_roles,
                                   split_seed, token_bytes, tokenizer_hash)
from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

SEED_MODES = ("normalized", "raw")
# Arguments of a method that are how to run it, not what it computes: never options, never in the cache key.
RUNTIME_ARGS = ("progress",)
# Options that change where or in what blocks a build runs, not its result: not in the cache key.
EXECUTION_OPTIONS = ("device", "block", "search_dtype")

# Value checks of the options, by option name (an option means the same in every method that has it):
# name -> (test, what the value must be).
OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed_mode": (lambda v: v in SEED_MODES, f"one of {list(SEED_MODES)}"),
    "holdout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "aux_vocab_cutoff": (lambda v: v is None or v >= 1, "null (all aux ids) or >= 1"),
    "k": (lambda v: v >= 1, ">= 1"),
    "neighborhood": (lambda v: v >= 1, ">= 1"),
    "std_filter": (lambda v: v is None or (len(v) == 2 and v[0] >= 0 and v[1] >= 0),
                   "null (off) or [min kept scores, max std], both >= 0"),
    "reweight": (lambda v: v >= 0, ">= 0"),
    "dim": (lambda v: v is None or v >= 1, "null (all dims) or >= 1"),
    "block": (lambda v: v >= 1, ">= 1"),
    "search_dtype": (lambda v: v in SEARCH_DTYPES, f"one of {list(SEARCH_DTYPES)}"),
    "device": (lambda v: v is None or str(v).split(":")[0] in ("cpu", "cuda", "mps"),
               "null (the main model's device), cpu, cuda or cuda:N"),
}


@dataclass
class AlignOptions:
    """Options every method has (``align`` reads them); a method's signature may name them too, without a
    default (the default is stated here, once). Subclasses: one per method, made by :func:`align_method`."""

    name: str = ""  # the method; each method's options class sets its own name as the default
    seed_mode: str = "normalized"  # normalized: Ġ/▁/<0x..> reduced to bytes | raw: exact vocab strings (reference)
    holdout: float = 0.1  # share of the seed dictionary held out to report P@1 (not used for fitting)
    seed: int = 0  # of the held-out split
    # only the first N aux ids get rows; null: all (the default). Not a frequency cutoff for every tokenizer:
    # Gemma-3's single characters (digits, space, punctuation) all have ids >= 236,743.
    aux_vocab_cutoff: int | None = None
    normalize_rows: bool = False  # rows rescaled to sum to one (reference: false, projected mass is not 1)

    def __post_init__(self) -> None:
        method = ALIGN_METHODS.get(self.name)
        if method is None:
            raise FusionlabError(f"align_method.name={self.name!r} is not an alignment method; use one of "
                                 f"{sorted(ALIGN_METHODS)} (align_method=<name>).")
        if type(self) is not method.options:
            raise FusionlabError(f"align_method.name={self.name!r} does not match the selected method's options "
                                 f"({type(self).__name__}); pick the method with align_method={self.name}.")
        for f in dataclasses.fields(self):
            check = OPTION_CHECKS.get(f.name)
            value = getattr(self, f.name)
            if check is not None and not check[0](value):
                raise FusionlabError(f"align_method.{f.name}={value!r} is out of range for method {self.name!r}: "
                                     f"it must be {check[1]}.")

    def method_params(self) -> dict[str, Any]:
        """The keyword arguments of the method function (its own options and the shared ones it names)."""
        return {n: getattr(self, n) for n in ALIGN_METHODS[self.name].params}

    def key_params(self) -> dict[str, Any]:
        """Everything that determines the alignment's content (its cache key)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", *EXECUTION_OPTIONS)}


@dataclass(frozen=True)
class AlignMethod:
    fn: Callable[..., Alignment]
    options: type[AlignOptions]
    params: tuple[str, ...]  # keyword-only parameters of fn that are options
    runtime: tuple[str, ...]  # keyword-only parameters of fn among RUNTIME_ARGS


ALIGN_METHODS: dict[str, AlignMethod] = {}


def align_method(fn: Callable[..., Alignment]) -> Callable[..., Alignment]:
    """Register ``fn`` as the alignment method ``fn.__name__``, its options read from its signature."""
    hints = typing.get_type_hints(fn)
    shared = {f.name for f in dataclasses.fields(AlignOptions)}
    own, params, runtime = [], [], []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name in RUNTIME_ARGS:
            runtime.append(p.name)
            continue
        params.append(p.name)
        if p.name in shared:
            if p.default is not inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: shared option {p.name!r} takes its default from AlignOptions")
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: option {p.name!r} needs a default")
        own.append((p.name, hints[p.name], field(default=p.default)))
    cls_name = "".join(part.title() for part in fn.__name__.split("_")) + "Options"
    cls = dataclasses.make_dataclass(cls_name, [("name", str, field(default=fn.__name__)), *own], bases=(AlignOptions,),
                                     namespace={"__doc__": f"Options of the {fn.__name__!r} alignment method."})
    cls.__module__ = __name__
    globals()[cls_name] = cls  # importable by name: configs holding it can be pickled (multirun launchers)
    ALIGN_METHODS[fn.__name__] = AlignMethod(fn, cls, tuple(params), tuple(runtime))
    return fn


def align_options(method: str | AlignOptions = "vecmap_csls", **params: Any) -> AlignOptions:
    """The typed options of ``method`` from keyword values (unknown options are named), or ``method`` itself."""
    if isinstance(method, AlignOptions):
        if params:
            return dataclasses.replace(method, **params)
        return method
    if method not in ALIGN_METHODS:
        raise FusionlabError(f"Unknown align method {method!r}; use one of {sorted(ALIGN_METHODS)}.")
    options = ALIGN_METHODS[method].options
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise FusionlabError(f"Unknown align_method option(s) {unknown} for method {method!r}; "
                             f"valid options are {sorted(known - {'name'})}.")
    return options(**{"name": method, **params})


def _vocab_sizes(aux_model, main_model) -> tuple[int, int]:
    return output_embeddings(aux_model).shape[0], output_embeddings(main_model).shape[0]


def _rows_limit(n: int, cutoff: int | None) -> int:
    return n if not cutoff else min(int(cutoff), n)


@align_method
def vecmap_csls(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str, holdout: float, seed: int,
                aux_vocab_cutoff: int | None, k: int = 10, neighborhood: int = 1, threshold: float = 0.1,
                std_filter: list[float] | None = (5, 0.01), whiten: bool = True, reweight: float = 0.5,
                dim: int | None = None, block: int = 2048, device: str | None = None, search_dtype: str = "auto",
                progress: bool = False) -> Alignment:
    """EVA: supervised VecMap on the output embeddings, then CSLS top-k per aux token (ALGORITHMS.md §1).

    ``k`` main tokens kept per aux token; CSLS ``neighborhood`` (EVA: 1); scores below ``threshold``
    dropped; ``std_filter`` [n, s] drops rows with > n kept scores whose std <= s; ``dim`` keeps the
    leading mapped dims (VecMap's --dim_reduction). The CSLS passes (two aux_vocab × main_vocab × dim
    products, the whole cost) run on ``device`` (default: the main model's device), ``block`` aux rows
    at a time, searching in ``search_dtype`` (auto: bfloat16 where faster) and scoring in float32
    (:func:`~fusionlab.align.vecmap.csls_topk`): the full 262k × 49k Gemma-3 → SmolLM2 pair takes
    ~2 min on 2 CPU cores. Main lm_head rows past the main tokenizer (padding) are never targets,
    aux rows past the aux tokenizer project nowhere. P@1 is measured on held-out pairs of the whole
    seed dictionary: pairs past a cutoff count as misses.
    """
    x, z = output_embeddings(aux_model).float().cpu(), output_embeddings(main_model).float().cpu()
    device = torch.device(device) if device else output_embeddings(main_model).device
    n_aux, n_main = x.shape[0], z.shape[0]
    limit = min(_rows_limit(n_aux, aux_vocab_cutoff), len(aux_tok))
    pairs = seed_dictionary(aux_tok, main_tok, seed_mode, n_aux, n_main)
    fit, test = split_seed(pairs, holdout, seed)
    train = fit[fit[:, 0] < limit]  # a cutoff (VecMap's --vocabulary_cutoff) fits on the pairs inside it
    if train.shape[0] < min(x.shape[1], z.shape[1]):
        log.warning("Only %d seed pairs for %d/%d-dim embeddings: the whitening is rank-deficient",
                    train.shape[0], x.shape[1], z.shape[1])
    x = x[:limit]
    t0 = time.perf_counter()
    xm, zm = supervised_map(x, z, train[:, 0], train[:, 1], whiten=whiten, reweight=reweight, dim=dim)
    t_map = time.perf_counter() - t0
    aux_special = special_ids(aux_tok)
    rows = torch.tensor([i for i in range(limit) if i not in aux_special], dtype=torch.long)
    main_special = {i for i in special_ids(main_tok) if i < n_main}
    excluded = torch.tensor(sorted(main_special | set(range(len(main_tok), n_main))), dtype=torch.long)
    cols, vals, top1 = csls_topk(xm.to(device), zm.to(device), k=k, neighborhood=neighborhood, threshold=threshold,
                                 std_filter=tuple(std_filter) if std_filter else None, excluded_cols=excluded,
                                 rows=rows, block=block, search_dtype=search_dtype, progress=progress)
    if limit < n_aux:  # tokens past the cutoff (or past the aux tokenizer) project nowhere
        cols = torch.cat([cols, torch.full((n_aux - limit, cols.shape[1]), -1, dtype=torch.long)])
        vals = torch.cat([vals, torch.zeros(n_aux - limit, vals.shape[1])])
        top1 = torch.cat([top1, torch.full((n_aux - limit,), -1, dtype=torch.long)])
    stats = {"seed_pairs": int(pairs.shape[0]), "train_pairs": int(train.shape[0]), "test_pairs": int(test.shape[0]),
             "map_s": round(t_map, 3), "csls_s": round(time.perf_counter() - t0 - t_map, 3),
             "rows_computed": int(len(rows))}
    if test.shape[0]:
        stats["p_at_1"] = float((top1[test[:, 0]] == test[:, 1]).float().mean())
        inside = test[:, 0] < limit
        if not bool(inside.all()) and bool(inside.any()):
            stats["p_at_1_inside_cutoff"] = float((top1[test[inside, 0]] == test[inside, 1]).float().mean())
    return Alignment(cols, vals, n_main, "vecmap_csls", stats)


def _exact_cols(aux_tok, main_tok, seed_mode: str, n_aux: int, n_main: int, limit: int) -> tuple[torch.Tensor, int]:
    """(aux_vocab, 1) main ids of the tokens both vocabularies spell the same (-1: none), and their count."""
    pairs = seed_dictionary(aux_tok, main_tok, seed_mode, n_aux, n_main, aux_limit=limit)
    cols = torch.full((n_aux, 1), -1, dtype=torch.long)
    cols[pairs[:, 0], 0] = pairs[:, 1]
    return cols, int(pairs.shape[0])


@align_method
def exact(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str, aux_vocab_cutoff: int | None) -> Alignment:
    """Each aux token maps to the main token with the same surface form (weight 1), else nowhere."""
    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    cols, n_pairs = _exact_cols(aux_tok, main_tok, seed_mode, n_aux, n_main, _rows_limit(n_aux, aux_vocab_cutoff))
    return Alignment(cols, (cols >= 0).float(), n_main, "exact", {"seed_pairs": n_pairs})


@align_method
def mined(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str, aux_vocab_cutoff: int | None,
          progress: bool = False) -> Alignment:
    """MinED (FuseLLM): exact matches first, every other aux token to the main token at minimum edit distance
    (of the texts the tokens stand for; main control tokens are never targets)."""
    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    limit = _rows_limit(n_aux, aux_vocab_cutoff)
    cols, n_pairs = _exact_cols(aux_tok, main_tok, seed_mode, n_aux, n_main, limit)
    a_text = [b.decode("utf-8", "replace") if b is not None else None for b in token_bytes(aux_tok, n_aux)]
    m_bytes = token_bytes(main_tok, n_main)
    m_special = special_ids(main_tok)
    m_ids = [j for j in range(n_main) if m_bytes[j] and j not in m_special]
    a_special = special_ids(aux_tok)
    todo = [i for i in range(limit) if cols[i, 0] < 0 and a_text[i] and i not in a_special]
    m_text = [m_bytes[j].decode("utf-8", "replace") for j in m_ids]
    nearest = nearest_by_edit_distance([a_text[i] for i in todo], m_text, progress=progress)
    if todo:
        cols[torch.tensor(todo), 0] = torch.tensor(m_ids)[torch.from_numpy(nearest)]
    return Alignment(cols, (cols >= 0).float(), n_main, "mined", {"seed_pairs": n_pairs, "mined_rows": len(todo)})


def _map_specials(alignment: Alignment, aux_tok, main_tok, aux_eos_ids=()) -> int:
    """Point each aux control token at the main token playing the same role (bos->bos, eos->eos...)."""
    a_roles, m_roles = special_roles(aux_tok), special_roles(main_tok)
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for role in ("eos", *[r for r in ROLES if r != "eos"]):
        a, m = a_roles.get(role), m_roles.get(role)
        if a is None or m is None or a in pairs or (m in used and role != "eos"):
            continue  # e.g. main pad == main eos: do not send aux pad mass to eos
        pairs[a] = m
        used.add(m)
    for a in aux_eos_ids:  # chat "end of turn" tokens end the answer too
        if "eos" in m_roles:
            pairs.setdefault(int(a), m_roles["eos"])
    for a, m in pairs.items():
        if a < alignment.aux_vocab and m < alignment.main_vocab:
            alignment.cols[a] = -1
            alignment.vals[a] = 0
            alignment.cols[a, 0] = m
            alignment.vals[a, 0] = 1.0
    return len(pairs)


def effective_key_params(options: AlignOptions, n_aux: int) -> dict[str, Any]:
    """The options that determine the content, as the build will use them: defaults filled (the typed
    options), values that mean the same spelled one way (a cutoff at or past the aux vocabulary is no
    cutoff; a list and a tuple are the same std filter), so equal builds share one cache file."""
    params = options.key_params()
    cutoff = params.get("aux_vocab_cutoff")
    if cutoff is not None and cutoff >= n_aux:
        params["aux_vocab_cutoff"] = None
    if params.get("std_filter") is not None:
        params["std_filter"] = [float(v) for v in params["std_filter"]]
    return params


def same_vocabulary(aux_tok, main_tok, n_aux: int, n_main: int, aux_eos_ids=()) -> Alignment:
    """Members that share a tokenizer (two fine-tunes of one base): the exact identity projection, no build.

    Any learned map could only lose mass here. Rows past the tokenizer (lm_head padding) map nowhere, as
    ``mined`` treats them; the aux end-of-turn tokens still go to main's EOS.
    """
    real = min(len(aux_tok), n_aux, n_main)
    cols = torch.full((n_aux, 1), -1, dtype=torch.long)
    cols[:real, 0] = torch.arange(real)
    vals = (cols >= 0).float()
    result = Alignment(cols, vals, n_main, method="identity",
                       stats={"p_at_1": 1.0, "rows_mapped": real, "rows_total": n_aux, "nnz": real, "build_s": 0.0})
    result.stats["special_pairs"] = _map_specials(result, aux_tok, main_tok, aux_eos_ids)
    log.info("Aux and main share a tokenizer: identity projection (%d of %d aux rows), no alignment built", real, n_aux)
    return result


def align(aux_model, aux_tok, main_model, main_tok, method: str | AlignOptions = "vecmap_csls", *,
          cache_dir: str | Path | None = None, rebuild: bool = False, aux_eos_ids=(), progress: bool = False,
          **params: Any) -> Alignment:
    """Build (or load from ``cache_dir``) the projection of ``aux`` onto ``main``'s vocabulary.

    ``method`` is a method name with its options as keyword arguments, or an :class:`AlignOptions`
    (e.g. the composed ``align_method`` node). The cache key hashes both tokenizers, both output
    embedding matrices and every option as the build uses it (:func:`effective_key_params`), so a
    changed model or option never reuses an old file and equal builds share one. The build runs
    with torch threads set to the usable cores (the caller's setting is restored).
    """
    options = align_options(method, **params)
    spec = ALIGN_METHODS[options.name]
    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    key_params = {**effective_key_params(options, n_aux), "aux_eos_ids": sorted(int(i) for i in aux_eos_ids)}
    key = cache_key(options.name, key_params, tokenizer_hash(aux_tok), tokenizer_hash(main_tok),
                    embeddings_hash(aux_model), embeddings_hash(main_model))

    def build() -> Alignment:
        start = time.perf_counter()
        runtime = {"progress": progress} if "progress" in spec.runtime else {}
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(usable_cores())  # a build is the only work in flight: all the cores it may use
        try:
            result = spec.fn(aux_model, aux_tok, main_model, main_tok, **options.method_params(), **runtime)
        finally:
            torch.set_num_threads(saved_threads)
        n_special = _map_specials(result, aux_tok, main_tok, aux_eos_ids)
        if options.normalize_rows:
            result = result.normalized()
        mapped = (result.cols >= 0).any(dim=1)
        result.stats.update({"build_s": round(time.perf_counter() - start, 3), "special_pairs": n_special,
                             "rows_mapped": int(mapped.sum()), "rows_total": n_aux,
                             "nnz": int((result.cols >= 0).sum())})
        if "p_at_1" not in result.stats:  # methods without a fitted map: P@1 of the map on the same held-out pairs
            pairs = seed_dictionary(aux_tok, main_tok, options.seed_mode, n_aux, n_main)
            _, test = split_seed(pairs, options.holdout, options.seed)
            best = result.cols.gather(1, result.vals.argmax(dim=1, keepdim=True))[:, 0]
            hits = (best[test[:, 0]] == test[:, 1]).float()
            result.stats["p_at_1"] = float(hits.mean()) if len(test) else float("nan")
        log.info("Built %s alignment (%d aux -> %d main tokens) in %.1f s: %s", options.name, n_aux, n_main,
                 result.stats["build_s"], result.stats)
        return result

    return cached(build, Path(cache_dir) if cache_dir is not None else None, key, n_aux, n_main, rebuild)
