"""Answer extraction and scores, kept free of any model code so they can be checked by hand.

Tasks refer to them by name: :data:`EXTRACTORS` (read a prediction from a reply, match it against
the gold answer) and :data:`METRICS` (aggregate the predictions into the task's score).
"""
from __future__ import annotations

import ast
import math
import operator
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# 1,234 and 1234 and 12.5 and -3; a comma only groups thousands, so "1,2,3" is three numbers.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_TRIGGER = re.compile(r"the answer is", re.IGNORECASE)


def _to_number(token: str) -> float:
    value = float(token.replace(",", ""))
    return int(value) if value.is_integer() else value


def extract_number(text: str) -> float | int | None:
    """EVA's rule: the first number after the first "the answer is", else the last number, else None.

    A reply that states an answer and then rambles on ("The answer is 5. Wait, the answer is 6.")
    is scored on what it said first, as EVA's evaluation does.
    """
    trigger = _TRIGGER.search(text)
    if trigger:
        after = _NUMBER.search(text, trigger.end())
        if after:
            return _to_number(after.group())
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_VARIABLE = re.compile(r"^\s*[A-Za-z]\s*=(?!=)")  # a leading "X =" (the reply may repeat the prefix)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def calculate(expression: str) -> float | int | None:
    """The value of an arithmetic expression of numbers, + - * /, unary minus and parentheses, or None.

    Parsed with :mod:`ast` and evaluated node by node (never ``eval``): names, calls, powers and
    anything else are refused, so a model's reply cannot run code or ask for a huge power.
    """
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        raise ValueError(type(node).__name__)

    expression = _THOUSANDS.sub("", expression.replace("$", "")).strip().rstrip(".").strip()
    if not expression or len(expression) > 200:
        return None
    try:
        result = float(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    if result != result or result in (float("inf"), float("-inf")):
        return None
    return int(result) if result.is_integer() else result


def extract_equation(text: str) -> float | int | None:
    """The value of the equation a reply writes on its first line ("X = 70 - 27" or just " 70 - 27").

    The reply continues an assistant prefix such as "X =": its first line, after an optional
    repeated "X =", up to the next "=" (a model may append "= 43"), is evaluated by :func:`calculate`
    (the model sets up the equation, the calculator does the arithmetic); a line that is not an
    expression falls back to :func:`extract_number` on that line.
    """
    line = text.strip().split("\n")[0]
    line = _VARIABLE.sub("", line).split("=")[0]
    value = calculate(line)
    return value if value is not None else extract_number(line)


def numbers_equal(pred: float | int | None, gold: float | int, tol: float = 1e-4) -> bool:
    return pred is not None and abs(float(pred) - float(gold)) <= tol * max(1.0, abs(float(gold)))


def is_number(value: Any) -> bool:
    """A finite number, or text that reads as one (gold answers of the numeric tasks)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-E: after "the answer is" if present, else the last "(X)"."""
    triggers = list(_TRIGGER.finditer(text))
    if triggers:
        m = re.search(r"\(?\b([A-E])\b\)?", text[triggers[-1].end():])
        if m:
            return m.group(1)
    letters = re.findall(r"\(([A-E])\)", text)
    return letters[-1] if letters else None


def normalize_text(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_prediction(text: str) -> str:
    """The first non-empty line of an answer, as EVA scores NQ/TriviaQA."""
    for line in text.strip().split("\n"):
        if line.strip():
            return line.strip()
    return ""


def exact_match(pred: str, golds: Sequence[str]) -> bool:
    p = normalize_text(pred)
    return any(p == normalize_text(g) for g in golds)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu) with a variable number of references per example."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    # sacrebleu takes one stream per reference slot; missing references are None.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def first_line(text: str) -> str:
    """The first line of a generated text, stripped (generation tasks score one sentence)."""
    return text.strip().split("\n")[0].strip()


def choice_equal(pred: str | None, gold: str) -> bool:
    return pred is not None and pred == gold


@dataclass(frozen=True)
class Extractor:
    """How a task reads its prediction out of a reply, and when that prediction matches the gold answer."""

    parse: Callable[[str], Any]
    matches: Callable[[Any, Any], bool]
    # which gold answers ``matches`` can compare with, checked when the data loads (not after decoding), and the
    # words for the error message
    gold_ok: Callable[[Any], bool] = lambda answer: True
    gold: str = "any answer"


# A task names its extractor and metric (fusionlab.tasks.TaskDef); a new kind of answer is one entry here.
EXTRACTORS: dict[str, Extractor] = {
    "number": Extractor(extract_number, numbers_equal, is_number, "a number"),
    "equation": Extractor(extract_equation, numbers_equal, is_number, "a number"),
    "choice": Extractor(extract_choice, choice_equal),
    "short_answer": Extractor(qa_prediction, exact_match),
    "first_line": Extractor(first_line, exact_match),
}


def mean_match(preds: Sequence[Any], golds: Sequence[Any], extractor: Extractor) -> tuple[float, list[bool | None]]:
    """The share of predictions that match their gold answer, and each example's match."""
    correct: list[bool | None] = [extractor.matches(p, g) for p, g in zip(preds, golds)]
    return (sum(correct) / len(correct) if correct else 0.0), correct


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[float]]:
    """Each example's share of corpus BLEU's sufficient statistics (sacrebleu's sentence counts: n-gram matches
    and totals for n = 1..4, hypothesis and closest-reference lengths). Corpus BLEU of any multiset of examples
    is :func:`bleu_from_statistics` of their sum, so a bootstrap resamples rows instead of re-scoring text."""
    from sacrebleu.metrics.bleu import BLEU

    metric = BLEU(effective_order=True)  # affects only a sentence's score, not the counts taken here
    rows = []
    for pred, refs in zip(predictions, references):
        s = metric.sentence_score(pred, [r for r in refs if r is not None])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return rows


def bleu_from_statistics(summed: Sequence[float]) -> float:
    """Corpus BLEU (sacrebleu's formula, no smoothing) from summed :func:`bleu_statistics` rows."""
    from sacrebleu.metrics.bleu import BLEU

    order = (len(summed) - 2) // 2
    counts, totals = [int(c) for c in summed[:order]], [int(t) for t in summed[order:2 * order]]
    return float(BLEU.compute_bleu(counts, totals, int(summed[-2]), int(summed[-1])).score)


def corpus_bleu(preds: Sequence[Any], golds: Sequence[Any], extractor: Extractor) -> tuple[float, list[bool | None]]:
    """Corpus BLEU over every prediction; no per-example verdict."""
    return bleu(preds, golds), [None] * len(preds)


# corpus-level metrics: (per-example sufficient statistics of (predictions, golds), the metric of their sum)
CORPUS_STATISTICS: dict[str, tuple[Callable[[Sequence[Any], Sequence[Any]], list[list[float]]],
                                   Callable[[Sequence[float]], float]]] = {
    "bleu": (bleu_statistics, bleu_from_statistics),
}

# metric name (the key written to metrics.json) -> (predictions, golds, extractor) -> (value, per-example match)
METRICS: dict[str, Callable[[Sequence[Any], Sequence[Any], Extractor], tuple[float, list[bool | None]]]] = {
    "accuracy": mean_match,
    "exact_match": mean_match,
    "bleu": corpus_bleu,
}
