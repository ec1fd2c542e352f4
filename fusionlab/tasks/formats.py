"""The small named pieces a task record is made of, besides its templates: how the gold answer is
normalised after loading, and how a few-shot demonstration answers. A task names them
(:class:`fusionlab.tasks.TaskDef`); a new form is one function and one entry here.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from fusionlab.errors import FusionlabError


def fill(template: str, row: dict[str, Any], what: str) -> str:
    """``template`` with the fields of one example or text row (``str.format``); a dict field
    (multiple-choice options) is written as one ``(key) value`` line per entry. ``what`` names the
    template's owner in the error about a missing field."""
    values = {k: "\n".join(f"({key}) {text}" for key, text in v.items()) if isinstance(v, dict) else v
              for k, v in row.items()}
    try:
        return template.format(**values)
    except KeyError as e:
        raise FusionlabError(f"{what} uses the field {e.args[0]!r}, which row {row.get('id', '?')!r} lacks "
                             f"(it has {sorted(row)}); add it to the data.") from None


# --- gold answers, normalised once after loading --------------------------------------------------

def answer_as_is(example: dict[str, Any]) -> Any:
    return example.get("answer")


def answer_aliases(example: dict[str, Any]) -> list[str]:
    """Every accepted answer string: a list, one string, or TriviaQA's ``{aliases, value}`` dict."""
    answers = example.get("answer", example.get("answers"))
    if isinstance(answers, dict):
        answers = answers.get("aliases") or [answers.get("value")]
    return [answers] if isinstance(answers, str) else list(answers or [])


def answer_references(example: dict[str, Any]) -> Any:
    """Reference texts as a list (one string becomes a one-item list)."""
    answer = example.get("answer")
    return [answer] if isinstance(answer, str) else answer


ANSWERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "as_is": answer_as_is,
    "aliases": answer_aliases,
    "references": answer_references,
}


# --- what a few-shot demonstration replies ----------------------------------------------------------

def demo_worked_solution(example: dict[str, Any]) -> str:
    """The worked solution when the data has one (GSM8K's, its ``#### N`` line dropped), then the answer sentence."""
    solution = example.get("solution")
    if solution:
        return solution.split("####")[0].strip() + f" The answer is {example['answer']}."
    return f"The answer is {example['answer']}."


def demo_choice(example: dict[str, Any]) -> str:
    return f"The answer is ({example['answer']})."


def demo_first_reference(example: dict[str, Any]) -> str:
    gold = example["answer"]
    return gold[0] if isinstance(gold, list) else str(gold)


_NUM = r"\s*(-?[\d.]+)\s*"
_SOLVE = [(re.compile(rf"^{_NUM}\+\s*X\s*={_NUM}$"), "{1} - {0}"), (re.compile(rf"^\s*X\s*\+{_NUM}={_NUM}$"), "{1} - {0}"),
          (re.compile(rf"^{_NUM}-\s*X\s*={_NUM}$"), "{0} - {1}"), (re.compile(rf"^\s*X\s*-{_NUM}={_NUM}$"), "{1} + {0}")]


def _solved_for_x(equation: str) -> str:
    """AddSub's "74 + X = 86" style (a + X = b, X + a = b, a - X = b, X - a = b) as "X = 86 - 74"."""
    for pattern, solved in _SOLVE:
        m = pattern.match(equation)
        if m:
            return "X = " + solved.format(*m.groups())
    return equation


def demo_equation(example: dict[str, Any]) -> str:
    """``X = <expression>`` from the example's annotated ``equation`` (AddSub's "X = 70 - 27", SVAMP's
    "( 76.0 - 25.0 )", ASDiv's formula "7+2=9"), with "76.0" written "76"; ``X = <answer>`` when the
    annotation is missing or does not evaluate to the gold answer (a demonstration never shows a
    wrong equation)."""
    from fusionlab.tasks.scoring import calculate, numbers_equal

    raw = str(example.get("equation") or "")
    expression = re.sub(r"^\s*[A-Za-z]\s*=", "", _solved_for_x(raw)).split("=")[0]
    expression = " ".join(re.sub(r"(\d+)\.0\b", r"\1", expression).split())
    if not numbers_equal(calculate(expression), example["answer"]):
        expression = str(example["answer"])
    return f"X = {expression}"


DEMOS: dict[str, Callable[[dict[str, Any]], str]] = {
    "worked_solution": demo_worked_solution,
    "equation": demo_equation,
    "choice": demo_choice,
    "first_reference": demo_first_reference,
}
