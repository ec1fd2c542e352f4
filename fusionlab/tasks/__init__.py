"""Benchmarks as data: each task is one :class:`TaskDef` record in the :data:`TASKS` registry.

A record says where the data comes from (a small public file shipped in ``fusionlab/data/tasks``,
source and license beside it, or HF ``datasets`` for sets too large to ship; ``task.path`` is a
user's JSONL file instead), how to prompt (instruction template, assistant prefix, few-shot reply),
how to read and score a reply (an extractor and a metric, looked up by name in
:mod:`fusionlab.tasks.scoring`), the default ``max_new_tokens`` and the stop strings. No function
here looks at a task's name: adding a task that resembles an existing one is one record (reuse a
preset such as :data:`MATH`) plus its data file.

Every example is a dict with at least ``id``, ``question`` and ``answer`` (a number for math tasks,
a list of strings for QA and generation tasks).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fusionlab.errors import FusionlabError
from fusionlab.io import read_jsonl
from fusionlab.tasks.formats import ANSWERS, DEMOS, fill
from fusionlab.tasks.scoring import CORPUS_STATISTICS, EXTRACTORS, METRICS

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"

COT_PREFIX = "Let's think step by step."
MATH_INSTRUCTION = 'Solve the problem step by step. End your reply with "The answer is N." where N is a number.'


@dataclass(frozen=True)
class TaskDef:
    """What a task is: where its data lives, how to prompt, how to read and score a reply.

    ``prompt`` is the user message, a ``str.format`` template over the example's fields (a dict
    field such as multiple-choice options is written as ``(key) value`` lines; literal braces are
    doubled). ``answer``, ``demo``, ``extractor`` and ``metric`` name entries of
    :data:`~fusionlab.tasks.formats.ANSWERS`, :data:`~fusionlab.tasks.formats.DEMOS`,
    :data:`~fusionlab.tasks.scoring.EXTRACTORS` and :data:`~fusionlab.tasks.scoring.METRICS`.
    """

    name: str
    prompt: str
    extractor: str
    metric: str  # also the key the score is written under in metrics.json
    assistant_prefix: str = ""  # the text the reply starts with, after the chat template's generation prompt
    demo: str = "first_reference"  # what a few-shot demonstration replies
    answer: str = "as_is"  # how the gold answer is normalised after loading
    data_file: str | None = None  # shipped file under fusionlab/data/tasks
    hf_dataset: tuple[str, str | None, str] | None = None  # (path, config, split) for datasets.load_dataset
    max_new_tokens: int = 256  # used unless generation.max_new_tokens is set
    stop: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)  # source field -> canonical field, applied in order

    def __post_init__(self) -> None:
        for attr, registry in (("extractor", EXTRACTORS), ("metric", METRICS), ("demo", DEMOS), ("answer", ANSWERS)):
            if getattr(self, attr) not in registry:
                raise FusionlabError(f"Task {self.name!r}: {attr}={getattr(self, attr)!r} is not one of {sorted(registry)}.")


# Presets shared by the tasks that read and score the same way.
MATH = dict(prompt="{question}\n" + MATH_INSTRUCTION, assistant_prefix=COT_PREFIX, demo="worked_solution",
            extractor="number", metric="accuracy")
CHOICE = dict(prompt='{question}\nAnswer Choices:\n{choices}\nEnd your reply with "The answer is X." where X is one '
                     "of the letters.", assistant_prefix=COT_PREFIX, demo="choice", extractor="choice",
              metric="accuracy")
# The letter alone (no chain of thought): one short line, for models too small to reason their way there.
CHOICE_DIRECT = dict(prompt="{question}\nAnswer Choices:\n{choices}\nAnswer with the letter of the correct choice.",
                     assistant_prefix="The answer is", demo="choice", extractor="choice", metric="accuracy",
                     max_new_tokens=4, stop=("\n",))
SHORT_QA = dict(prompt="Answer the question with a short phrase.\nQuestion: {question}", assistant_prefix="Answer:",
                extractor="short_answer", metric="exact_match", answer="aliases", max_new_tokens=32, stop=("\n",))
# The model writes the equation ("X = 54 - 28"), a calculator evaluates it (the embedded models set up
# equations well but mis-add under chain-of-thought); one line, so decoding stops after ~8 tokens.
EQUATION = dict(prompt="{question}", assistant_prefix="X =", demo="equation", extractor="equation",
                metric="accuracy", max_new_tokens=16, stop=("\n",))
ONE_LINE = dict(extractor="first_line", metric="bleu", answer="references", stop=("\n",))

TASKS: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("addsub", data_file="addsub/test.jsonl", **MATH),
    TaskDef("gsm8k", data_file="gsm8k/test.jsonl", fields={"final": "answer", "answer": "solution"}, **MATH),
    TaskDef("asdiv", data_file="asdiv/test.jsonl", **MATH),
    TaskDef("svamp", data_file="svamp/test.jsonl", **MATH),
    TaskDef("addsub_eq", data_file="addsub/test.jsonl", **EQUATION),
    TaskDef("asdiv_eq", data_file="asdiv/test.jsonl", fields={"formula": "equation"}, **EQUATION),
    TaskDef("svamp_eq", data_file="svamp/test.jsonl", **EQUATION),
    TaskDef("commonsenseqa", data_file="commonsenseqa/dev.jsonl", **CHOICE),
    TaskDef("commonsenseqa_direct", data_file="commonsenseqa/dev.jsonl", **CHOICE_DIRECT),
    TaskDef("nq", hf_dataset=("nq_open", None, "validation"), **SHORT_QA),
    TaskDef("triviaqa", hf_dataset=("trivia_qa", "rc.nocontext", "validation"), **SHORT_QA),
    TaskDef("e2e", prompt="Write one sentence describing a restaurant with these attributes: {question}",
            data_file="e2e/test.jsonl", max_new_tokens=64, fields={"mr": "question", "references": "answer"},
            **ONE_LINE),
    TaskDef("flores", prompt="Translate the following Chinese text into English.\nChinese: {question}",
            assistant_prefix="English:", hf_dataset=("facebook/flores", "zho_Hans-eng_Latn", "devtest"),
            max_new_tokens=128, fields={"source": "question", "target": "answer",  # a user's JSONL pairs, or
                                        "sentence_zho_Hans": "question", "sentence_eng_Latn": "answer"},  # HF's
            **ONE_LINE),
]}


SPLITS = ("all", "dev", "test")


@dataclass
class TaskConfig:
    """Which task to run and on which examples (the ``task:`` node).

    ``split``: ``all`` evaluates the first ``limit`` examples (seeded random with ``shuffle``), with
    demonstrations drawn from the rest. ``dev``/``test`` split a seeded permutation of the data
    (``seed``): its first ``dev_size`` examples are the dev part, where demonstrations come from and
    settings are chosen, the rest the test part, which is reported; ``dev`` evaluates the dev part minus
    the demonstrations, ``test`` the test part (``limit``: its first N).
    """

    name: str = "addsub"
    path: str | None = None  # a JSONL file instead of the task's default data
    limit: int | None = None  # first N examples (seeded random N with shuffle); None: all
    seed: int = 0
    shuffle: bool = False
    n_shot: int = 0  # few-shot demonstrations, drawn from the same data, never an evaluated example
    split: str = "all"  # all | dev | test (see above)
    dev_size: int = 60  # examples in the dev part of a dev/test split

    def __post_init__(self) -> None:
        get_task(self.name)
        if self.limit is not None and self.limit < 1:
            raise FusionlabError(f"task.limit={self.limit} must be a positive number of examples (or null for all).")
        if self.n_shot < 0:
            raise FusionlabError(f"task.n_shot={self.n_shot} must be >= 0.")
        if self.split not in SPLITS:
            raise FusionlabError(f"task.split={self.split!r} is not one of {list(SPLITS)}.")
        if self.split != "all" and self.n_shot >= self.dev_size:
            raise FusionlabError(f"task.dev_size={self.dev_size} leaves no dev example besides the {self.n_shot} "
                                 "demonstrations (task.n_shot); raise task.dev_size.")
        if self.path is not None and not Path(self.path).expanduser().is_file():
            raise FusionlabError(f"task.path={self.path!r} is not a file; give a JSONL file of examples "
                                 "(or task.path=null for the task's shipped data).")


@dataclass
class TaskInputs:
    """What a run evaluates: the examples, the few-shot demonstrations, and the dev examples (neither
    evaluated nor demonstrations: for warm-ups and per-member scores; empty under ``split: all``)."""

    task: TaskDef
    examples: list[dict[str, Any]]
    shots: list[dict[str, Any]]
    dev: list[dict[str, Any]]


def task_inputs(config: TaskConfig) -> TaskInputs:
    """The examples, demonstrations and dev examples that ``config`` selects (the data is read once)."""
    task = get_task(config.name)
    everything = load_examples(task, path=config.path)
    if config.split == "all":
        examples = select_examples(everything, config.limit, config.seed, config.shuffle)
        shots = few_shot_examples(task, config.n_shot, seed=config.seed, exclude={ex["id"] for ex in examples},
                                  pool=everything)
        return TaskInputs(task, examples, shots, [])
    if config.dev_size >= len(everything):
        raise FusionlabError(f"task.dev_size={config.dev_size} leaves no test examples: task {task.name!r} has "
                             f"{len(everything)}; lower task.dev_size.")
    order = select_examples(everything, None, config.seed, shuffle=True)
    dev_part, test_part = order[:config.dev_size], order[config.dev_size:]
    shots = few_shot_examples(task, config.n_shot, seed=config.seed, pool=dev_part)
    dev = [ex for ex in dev_part if ex["id"] not in {s["id"] for s in shots}]
    examples = select_examples(dev if config.split == "dev" else test_part, config.limit)
    return TaskInputs(task, examples, shots, dev)


def get_task(task: str | TaskDef) -> TaskDef:
    """The record of a task name (a TaskDef passes through, so Python callers can use unregistered tasks)."""
    if isinstance(task, TaskDef):
        return task
    if task not in TASKS:
        raise FusionlabError(f"Unknown task {task!r}; known tasks are {sorted(TASKS)} (task=<name>).")
    return TASKS[task]


def _normalise(task: TaskDef, raw: dict[str, Any], index: int, source: str) -> dict[str, Any]:
    ex = dict(raw)
    for src, dst in task.fields.items():
        if src in raw:
            ex[dst] = raw[src]
    ex["answer"] = ANSWERS[task.answer](ex)
    ex.setdefault("id", index)
    missing = [k for k in ("question", "answer") if ex.get(k) is None]
    if missing:
        null = [k for k in missing if k in raw or k in {d for s, d in task.fields.items() if s in raw}]
        what = f"a null {null}" if null == missing else f"no {missing} field(s)"
        raise FusionlabError(
            f"Example {index} of task {task.name!r} ({source}) has {what}; each JSONL line needs "
            f"'question' and 'answer' (found keys {sorted(raw)})."
        )
    scalar = (str, int, float)
    answer = ex["answer"]
    if not isinstance(ex["question"], str) or isinstance(answer, bool) or not (
            isinstance(answer, scalar) or isinstance(answer, list) and answer and all(
                isinstance(a, scalar) and not isinstance(a, bool) for a in answer)):
        raise FusionlabError(
            f"Example {index} of task {task.name!r} ({source}): 'question' must be text and 'answer' a string, a number or a "
            f"list of them (the accepted answers), got question={ex['question']!r:.60} answer={answer!r:.60}."
        )
    extractor = EXTRACTORS[task.extractor]
    if not extractor.gold_ok(answer):
        raise FusionlabError(f"Example {index} of task {task.name!r} ({source}): its replies are scored against {extractor.gold}, "
                             f"but its answer is {answer!r:.60}; fix that line of the data (or use a task whose answers "
                             "are text).")
    return ex


def _read_hf(task: TaskDef) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise FusionlabError(
            f"Task {task.name!r} ships no data. Give a JSONL file with task.path=/path/to/{task.name}.jsonl "
            "(fields: question, answer), or `pip install datasets` and run with network access."
        ) from e
    path, name, split = task.hf_dataset
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as e:  # no network, unknown dataset, ...
        raise FusionlabError(
            f"Could not load {path} for task {task.name!r} from the HF hub ({type(e).__name__}: {e}). "
            f"Give a local JSONL file instead: task.path=/path/to/{task.name}.jsonl."
        ) from e


def load_examples(task: str | TaskDef, path: str | None = None, limit: int | None = None, seed: int = 0,
                  shuffle: bool = False) -> list[dict[str, Any]]:
    """Load a task's examples; ``limit`` picks the first n (or a seeded random n with ``shuffle``)."""
    task = get_task(task)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FusionlabError(f"Data file {str(p)!r} for task {task.name!r} does not exist; check task.path.")
        rows = read_jsonl(p)
    elif task.data_file is not None:
        rows = read_jsonl(DATA_DIR / task.data_file)
    elif task.hf_dataset is not None:
        rows = _read_hf(task)
    else:
        raise FusionlabError(f"Task {task.name!r} has no data of its own; give a JSONL file with "
                             f"task.path=/path/to/{task.name}.jsonl (fields: question, answer).")
    source = str(p) if path is not None else task.data_file or task.hf_dataset
    if not rows:
        raise FusionlabError(f"Task {task.name!r} has no examples (source: {source}).")
    return select_examples([_normalise(task, r, i, source) for i, r in enumerate(rows)], limit, seed, shuffle)


def select_examples(examples: list[dict[str, Any]], limit: int | None = None, seed: int = 0,
                    shuffle: bool = False) -> list[dict[str, Any]]:
    """The first ``limit`` examples (or a seeded random ``limit`` with ``shuffle``); all with no limit."""
    examples = list(examples)
    if shuffle:
        random.Random(seed).shuffle(examples)
    if limit is not None:
        if int(limit) < 1:
            raise FusionlabError(f"task.limit={limit} must be a positive number of examples (or null for all).")
        examples = examples[: int(limit)]
    return examples


def demo_answer(task: str | TaskDef, example: dict[str, Any]) -> str:
    """The assistant reply a few-shot demonstration shows for ``example``."""
    return DEMOS[get_task(task).demo](example)


def few_shot_examples(task: str | TaskDef, n_shot: int, seed: int = 0, path: str | None = None,
                      exclude: set[Any] = frozenset(), pool: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``n_shot`` seeded demonstrations from the task's data (``pool``: all of it, already loaded),
    never one of the ``exclude`` ids."""
    if n_shot <= 0:
        return []
    task = get_task(task)
    pool = [ex for ex in (pool if pool is not None else load_examples(task, path=path)) if ex["id"] not in exclude]
    if len(pool) < n_shot:
        raise FusionlabError(f"task.n_shot={n_shot} but only {len(pool)} examples of {task.name!r} are left for "
                             "demonstrations; lower task.n_shot or task.limit.")
    return random.Random(seed).sample(pool, n_shot)


def build_messages(task: str | TaskDef, example: dict[str, Any],
                   shots: list[dict[str, Any]] = ()) -> tuple[list[dict[str, str]], str]:
    """Chat messages for one example (after optional few-shot turns) plus the text the reply starts with."""
    task = get_task(task)
    owner = f"The prompt of task {task.name!r}"
    messages: list[dict[str, str]] = []
    for shot in shots:
        messages += [{"role": "user", "content": fill(task.prompt, shot, owner)},
                     {"role": "assistant", "content": demo_answer(task, shot)}]
    messages.append({"role": "user", "content": fill(task.prompt, example, owner)})
    return messages, task.assistant_prefix


def task_prompts(task: str | TaskDef, examples: list[dict[str, Any]], tokenizer, use_chat_template: bool,
                 shots: list[dict[str, Any]] = ()) -> list[str]:
    """Every example's prompt in one model's format (its chat template, or plain text for base models)."""
    from fusionlab.models.chat import render_prompt

    prompts = []
    for ex in examples:
        messages, prefix = build_messages(task, ex, shots)
        prompts.append(render_prompt(tokenizer, messages, use_chat_template=use_chat_template,
                                     assistant_prefix=prefix))
    return prompts


def task_stops(task: str | TaskDef, use_chat_template: bool) -> list[str]:
    """Task stop strings, plus the next-question marker that base models (plain-text prompts) tend to write."""
    return list(get_task(task).stop) + ([] if use_chat_template else ["\nQuestion:"])


def extract_answer(task: str | TaskDef, text: str) -> Any:
    """The prediction a task scores: a number, a choice letter, or cleaned text."""
    return EXTRACTORS[get_task(task).extractor].parse(text)


def corpus_statistics(task: str | TaskDef, outputs: list[str], examples: list[dict[str, Any]]
                      ) -> tuple[list[list[float]], Callable[[Sequence[float]], float]] | None:
    """For a corpus-level metric (BLEU): each example's sufficient statistics and the metric of their sum, what a
    bootstrap interval needs (``fusionlab.metrics.stats.paired_bootstrap_corpus``); None for per-example metrics."""
    task = get_task(task)
    if task.metric not in CORPUS_STATISTICS:
        return None
    statistics, from_sums = CORPUS_STATISTICS[task.metric]
    extractor = EXTRACTORS[task.extractor]
    return statistics([extractor.parse(o) for o in outputs], [ex["answer"] for ex in examples]), from_sums


def score(task: str | TaskDef, outputs: list[str], examples: list[dict[str, Any]]) -> tuple[dict[str, float], list[bool | None]]:
    """Score model outputs against gold answers: (task metrics, per-example correctness or None)."""
    task = get_task(task)
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
    extractor = EXTRACTORS[task.extractor]
    preds = [extractor.parse(o) for o in outputs]
    value, correct = METRICS[task.metric](preds, [ex["answer"] for ex in examples], extractor)
    return {task.metric: value, "n": len(examples)}, correct
