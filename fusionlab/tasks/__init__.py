"""Benchmarks: data loading, prompts, answer extraction and scoring.

A task is a :class:`TaskDef` in the :data:`TASKS` registry. Its data comes from a small
public file shipped in ``fusionlab/data/tasks`` (source and license beside it), from a
user's JSONL file (``path``), or, for sets too large to ship, from HF ``datasets`` when
the user has network. Every example is a dict with at least ``id``, ``question`` and
``answer`` (a number for math tasks, a list of strings for QA and generation tasks).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionlab.errors import FusionlabError
from fusionlab.io import read_jsonl
from fusionlab.tasks.scoring import bleu, exact_match, extract_choice, extract_number, numbers_equal, qa_prediction

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"

MATH_INSTRUCTION = 'Solve the problem step by step. End your reply with "The answer is N." where N is a number.'


@dataclass(frozen=True)
class TaskDef:
    """What a task is: where its data lives, how to prompt, how to score."""

    name: str
    kind: str  # math | qa | generation | choice
    metric: str  # accuracy | exact_match | bleu
    data_file: str | None = None  # shipped file under fusionlab/data/tasks
    hf_dataset: tuple[str, ...] | None = None  # (path, config, split) for datasets.load_dataset
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)  # source field -> canonical field


TASKS: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("addsub", "math", "accuracy", "addsub/test.jsonl"),
    TaskDef("gsm8k", "math", "accuracy", "gsm8k/test.jsonl", fields={"final": "answer", "answer": "solution"}),
    TaskDef("asdiv", "math", "accuracy", "asdiv/test.jsonl"),
    TaskDef("svamp", "math", "accuracy", "svamp/test.jsonl"),
    TaskDef("commonsenseqa", "choice", "accuracy", "commonsenseqa/dev.jsonl"),
    TaskDef("nq", "qa", "exact_match", None, ("nq_open", None, "validation"), max_new_tokens=32,
            stop=("\n",)),
    TaskDef("triviaqa", "qa", "exact_match", None, ("trivia_qa", "rc.nocontext", "validation"),
            max_new_tokens=32, stop=("\n",)),
    TaskDef("e2e", "generation", "bleu", "e2e/test.jsonl", max_new_tokens=64, stop=("\n",),
            fields={"mr": "question", "references": "answer"}),
    TaskDef("flores", "generation", "bleu", None, ("facebook/flores", "zho_Hans-eng_Latn", "devtest"),
            max_new_tokens=128, stop=("\n",)),
]}


@dataclass
class TaskConfig:
    """Which task to run and on which examples (the ``task:`` node)."""

    name: str = "addsub"
    path: str | None = None  # a JSONL file instead of the task's default data
    limit: int | None = None  # first N examples (seeded random N with shuffle); None: all
    seed: int = 0
    shuffle: bool = False
    n_shot: int = 0  # few-shot demonstrations, drawn from the same data, never an evaluated example

    def __post_init__(self) -> None:
        get_task(self.name)
        if self.limit is not None and self.limit < 1:
            raise FusionlabError(f"task.limit={self.limit} must be a positive number of examples (or null for all).")
        if self.n_shot < 0:
            raise FusionlabError(f"task.n_shot={self.n_shot} must be >= 0.")
        if self.path is not None and not Path(self.path).expanduser().is_file():
            raise FusionlabError(f"task.path={self.path!r} is not a file; give a JSONL file of examples "
                                 "(or task.path=null for the task's shipped data).")


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        raise FusionlabError(f"Unknown task {name!r}; known tasks are {sorted(TASKS)} (task=<name>).")
    return TASKS[name]


def _normalise(task: TaskDef, raw: dict[str, Any], index: int) -> dict[str, Any]:
    ex = dict(raw)
    for src, dst in task.fields.items():
        if src in raw:
            ex[dst] = raw[src]
    if task.name == "flores" and "question" not in ex:  # HF flores pairs
        ex["question"] = ex.get("sentence_zho_Hans", ex.get("source"))
        ex["answer"] = [ex.get("sentence_eng_Latn", ex.get("target"))]
    if task.kind == "qa":
        answers = ex.get("answer", ex.get("answers"))
        if isinstance(answers, dict):  # trivia_qa's answer dict
            answers = answers.get("aliases") or [answers.get("value")]
        ex["answer"] = [answers] if isinstance(answers, str) else list(answers or [])
    if task.kind == "generation" and isinstance(ex.get("answer"), str):
        ex["answer"] = [ex["answer"]]
    ex.setdefault("id", index)
    missing = [k for k in ("question", "answer") if ex.get(k) is None]
    if missing:
        raise FusionlabError(
            f"Example {index} of task {task.name!r} has no {missing} field(s); each JSONL line needs "
            f"'question' and 'answer' (found keys {sorted(raw)})."
        )
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


def load_examples(name: str, path: str | None = None, limit: int | None = None, seed: int = 0,
                  shuffle: bool = False) -> list[dict[str, Any]]:
    """Load a task's examples; ``limit`` picks the first n (or a seeded random n with ``shuffle``)."""
    task = get_task(name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FusionlabError(f"Data file {str(p)!r} for task {name!r} does not exist; check task.path.")
        rows = read_jsonl(p)
    elif task.data_file is not None:
        rows = read_jsonl(DATA_DIR / task.data_file)
    else:
        rows = _read_hf(task)
    if not rows:
        raise FusionlabError(f"Task {name!r} has no examples (source: {path or task.data_file or task.hf_dataset}).")
    return select_examples([_normalise(task, r, i) for i, r in enumerate(rows)], limit, seed, shuffle)


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


def demo_answer(name: str, example: dict[str, Any]) -> str:
    """The assistant reply a few-shot demonstration shows for ``example``."""
    task = get_task(name)
    gold = example["answer"]
    if task.kind == "math":
        solution = example.get("solution")
        if solution:  # gsm8k: the worked solution, with its "#### N" line as the answer sentence
            return solution.split("####")[0].strip() + f" The answer is {gold}."
        return f"The answer is {gold}."
    if task.kind == "choice":
        return f"The answer is ({gold})."
    return gold[0] if isinstance(gold, list) else str(gold)


def few_shot_examples(name: str, n_shot: int, seed: int = 0, path: str | None = None,
                      exclude: set[Any] = frozenset(), pool: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``n_shot`` seeded demonstrations from the task's data (``pool``: all of it, already loaded),
    never one of the ``exclude`` ids."""
    if n_shot <= 0:
        return []
    pool = [ex for ex in (pool if pool is not None else load_examples(name, path=path)) if ex["id"] not in exclude]
    if len(pool) < n_shot:
        raise FusionlabError(f"task.n_shot={n_shot} but only {len(pool)} examples of {name!r} are left for "
                             "demonstrations; lower task.n_shot or task.limit.")
    return random.Random(seed).sample(pool, n_shot)


def build_messages(name: str, example: dict[str, Any],
                   shots: list[dict[str, Any]] = ()) -> tuple[list[dict[str, str]], str]:
    """Chat messages for one example (after optional few-shot turns) plus the text the reply starts with."""
    messages: list[dict[str, str]] = []
    for shot in shots:
        messages += [_user_message(name, shot), {"role": "assistant", "content": demo_answer(name, shot)}]
    messages.append(_user_message(name, example))
    return messages, _assistant_prefix(name)


def _user_message(name: str, example: dict[str, Any]) -> dict[str, str]:
    task = get_task(name)
    q = example["question"]
    if task.kind == "math":
        content = f"{q}\n{MATH_INSTRUCTION}"
    elif task.kind == "choice":
        options = "\n".join(f"({k}) {v}" for k, v in example["choices"].items())
        content = (f"{q}\nAnswer Choices:\n{options}\n"
                   'End your reply with "The answer is X." where X is one of the letters.')
    elif task.kind == "qa":
        content = f"Answer the question with a short phrase.\nQuestion: {q}"
    elif task.name == "e2e":
        content = f"Write one sentence describing a restaurant with these attributes: {q}"
    else:
        content = f"Translate the following Chinese text into English.\nChinese: {q}"
    return {"role": "user", "content": content}


def _assistant_prefix(name: str) -> str:
    kind = get_task(name).kind
    if kind in ("math", "choice"):
        return "Let's think step by step."
    return {"qa": "Answer:", "generation": "English:" if name == "flores" else ""}[kind]


def task_prompts(name: str, examples: list[dict[str, Any]], tokenizer, use_chat_template: bool,
                 shots: list[dict[str, Any]] = ()) -> list[str]:
    """Every example's prompt in one model's format (its chat template, or plain text for base models)."""
    from fusionlab.models.chat import render_prompt

    prompts = []
    for ex in examples:
        messages, prefix = build_messages(name, ex, shots)
        prompts.append(render_prompt(tokenizer, messages, use_chat_template=use_chat_template,
                                     assistant_prefix=prefix))
    return prompts


def task_stops(name: str, use_chat_template: bool) -> list[str]:
    """Task stop strings, plus the next-question marker that base models (plain-text prompts) tend to write."""
    return list(get_task(name).stop) + ([] if use_chat_template else ["\nQuestion:"])


def extract_answer(name: str, text: str) -> Any:
    """The prediction a task scores: a number, a choice letter, or cleaned text."""
    task = get_task(name)
    if task.kind == "math":
        return extract_number(text)
    if task.kind == "choice":
        return extract_choice(text)
    if task.kind == "qa":
        return qa_prediction(text)
    return text.strip().split("\n")[0].strip()


def score(name: str, outputs: list[str], examples: list[dict[str, Any]]) -> tuple[dict[str, float], list[bool | None]]:
    """Score model outputs against gold answers: (task metrics, per-example correctness or None)."""
    task = get_task(name)
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
    preds = [extract_answer(name, o) for o in outputs]
    if task.metric == "bleu":
        value = bleu(preds, [ex["answer"] for ex in examples])
        return {"bleu": value, "n": len(examples)}, [None] * len(examples)
    if task.kind == "math":
        correct = [numbers_equal(p, ex["answer"]) for p, ex in zip(preds, examples)]
    elif task.kind == "choice":
        correct = [p is not None and p == ex["answer"] for p, ex in zip(preds, examples)]
    else:
        correct = [exact_match(p, ex["answer"]) for p, ex in zip(preds, examples)]
    value = sum(correct) / len(correct) if correct else 0.0
    return {task.metric: value, "n": len(examples)}, correct
