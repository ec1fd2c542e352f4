"""Answer extraction and scoring against hand-computed values; data loading and its errors."""
from __future__ import annotations

import json

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.tasks import (TASKS, TaskConfig, build_messages, demo_answer, few_shot_examples, load_examples, score,
                             task_inputs)
from fusionlab.tasks.scoring import (bleu, calculate, exact_match, extract_choice, extract_equation, extract_number,
                                     normalize_text)


@pytest.mark.parametrize("text,expected", [
    ("So she gave 43 shells. The answer is 43.", 43),
    ("The answer is 1,234 apples", 1234),
    ("First 3, then 5. The answer is -7.", -7),
    ("the answer is 9.43 dollars", 9.43),
    ("The answer is 5. Wait, the answer is 6.", 5),  # EVA's rule: the first trigger (was the last: a bug)
    ("We had 12 then 15 left", 15),  # no trigger: last number
    ("numbers 1,2,3", 3),  # commas that do not group thousands separate numbers
    ("It costs $0.5 each", 0.5),
    ("I do not know.", None),
    ("The answer is unknown, maybe 8", 8),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_choice_and_normalisation():
    assert extract_choice("... so (B) is wrong. The answer is (C).") == "C"
    assert extract_choice("I pick (A) or maybe (D)") == "D"
    assert extract_choice("no idea") is None
    assert normalize_text("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Tour Eiffel"])
    assert not exact_match("Paris", ["Eiffel Tower"])


def test_math_accuracy_hand_computed():
    examples = [{"id": 0, "question": "q", "answer": 43}, {"id": 1, "question": "q", "answer": 9.43},
                {"id": 2, "question": "q", "answer": 5}]
    outputs = ["The answer is 43.", "so 9.430 it is", "The answer is 6."]
    metrics, correct = score("addsub", outputs, examples)
    assert correct == [True, True, False]
    assert metrics == {"accuracy": pytest.approx(2 / 3), "n": 3}


def test_exact_match_and_bleu_hand_computed():
    examples = [{"id": 0, "question": "q", "answer": ["Paris"]}, {"id": 1, "question": "q", "answer": ["4"]}]
    metrics, correct = score("nq", ["Paris\nmore text", "five"], examples)
    assert correct == [True, False] and metrics["exact_match"] == 0.5
    # identical hypothesis and reference: BLEU 100; no overlap at all: 0
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert bleu(["xyz uvw"], [["the cat sat on the mat"]]) == pytest.approx(0.0)
    # one reference among several matching is enough
    assert bleu(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]]) == pytest.approx(100.0)


@pytest.mark.parametrize("name,n", [("addsub", 395), ("gsm8k", 1319), ("asdiv", 2159), ("svamp", 1000),
                                    ("e2e", 630), ("commonsenseqa", 1221)])
def test_shipped_data_counts(name, n):
    examples = load_examples(name)
    assert len(examples) == n
    assert all("question" in e and e["answer"] is not None for e in examples[:20])


def test_gsm8k_gold_is_the_final_number():
    ex = load_examples("gsm8k", limit=1)[0]
    assert ex["answer"] == 18 and "####" in ex["solution"]


def test_limit_and_seeded_shuffle():
    assert [e["id"] for e in load_examples("addsub", limit=3)] == [1, 2, 3]
    a = load_examples("addsub", limit=5, seed=1, shuffle=True)
    b = load_examples("addsub", limit=5, seed=1, shuffle=True)
    c = load_examples("addsub", limit=5, seed=2, shuffle=True)
    assert [e["id"] for e in a] == [e["id"] for e in b] != [e["id"] for e in c]


def test_user_jsonl_and_errors(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    ex = load_examples("triviaqa", path=str(path))
    assert ex[0]["answer"] == ["Paris"]
    with pytest.raises(FusionlabError, match="does-not-exist.jsonl"):
        load_examples("addsub", path=str(tmp_path / "does-not-exist.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(FusionlabError, match="no examples"):
        load_examples("addsub", path=str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(FusionlabError, match="question"):
        load_examples("addsub", path=str(bad))
    with pytest.raises(FusionlabError, match="Unknown task 'nope'"):
        load_examples("nope")


def test_prompts_cover_every_task():
    for name in TASKS:
        ex = {"id": 0, "question": "Q?", "answer": ["a"], "choices": {"A": "x", "B": "y"}}
        messages, prefix = build_messages(name, ex)
        assert messages[-1]["role"] == "user" and "Q?" in messages[-1]["content"]
        assert isinstance(prefix, str)


def test_few_shot_demonstrations_are_seeded_and_never_evaluated():
    examples = load_examples("gsm8k", limit=5)
    shots = few_shot_examples("gsm8k", 3, seed=0, exclude={e["id"] for e in examples})
    assert len(shots) == 3 and not {s["id"] for s in shots} & {e["id"] for e in examples}
    assert [s["id"] for s in shots] == [s["id"] for s in few_shot_examples("gsm8k", 3, seed=0,
                                                                          exclude={e["id"] for e in examples})]
    messages, prefix = build_messages("gsm8k", examples[0], shots)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[1]["content"].endswith(f"The answer is {shots[0]['answer']}.")
    assert "####" not in messages[1]["content"] and "<<" in shots[0]["solution"]
    assert messages[-1]["content"].startswith(examples[0]["question"])
    assert prefix == "Let's think step by step."
    assert demo_answer("e2e", {"answer": ["ref one", "ref two"]}) == "ref one"
    with pytest.raises(FusionlabError, match="n_shot=5"):
        few_shot_examples("addsub", 5, path=None, exclude={e["id"] for e in load_examples("addsub")[:392]})


def test_a_math_task_defined_only_as_a_record_works_end_to_end(tmp_path, monkeypatch):
    """Adding a task = one record (here the MATH preset) + its data file; prompts, demos and scores follow."""
    from fusionlab.tasks import MATH, MATH_INSTRUCTION, TaskConfig, TaskDef, task_prompts, task_stops

    data = tmp_path / "mawps.jsonl"
    data.write_text("".join(json.dumps({"id": f"m{i}", "question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                            for i in range(1, 5)))
    monkeypatch.setitem(TASKS, "mawps", TaskDef("mawps", data_file=str(data), max_new_tokens=64, **MATH))
    assert TaskConfig(name="mawps").name == "mawps"  # the typed config accepts it: task.name=mawps on the CLI
    examples = load_examples("mawps", limit=2)
    shots = few_shot_examples("mawps", 1, seed=0, exclude={e["id"] for e in examples}, pool=load_examples("mawps"))
    shot = shots[0]
    prompts = task_prompts("mawps", examples, None, use_chat_template=False, shots=shots)
    assert prompts[0] == (f"Question: {shot['question']}\n{MATH_INSTRUCTION}\nAnswer: The answer is {shot['answer']}.\n"
                          f"Question: What is 1 + 1?\n{MATH_INSTRUCTION}\nAnswer: Let's think step by step.")
    assert task_stops("mawps", use_chat_template=False) == ["\nQuestion:"]
    metrics, correct = score("mawps", ["1 + 1 = 2. The answer is 2.", "The answer is 5."], examples)
    assert correct == [True, False] and metrics == {"accuracy": 0.5, "n": 2}


def test_a_new_generation_task_gets_its_own_prompt():
    """The old code gave every unknown generation task the Chinese-translation prompt."""
    from fusionlab.tasks import ONE_LINE, TaskDef

    haiku = TaskDef("haiku", prompt="Write a haiku about {question}.", assistant_prefix="Haiku:", **ONE_LINE)
    messages, prefix = build_messages(haiku, {"id": 0, "question": "rain", "answer": ["x"]})
    assert messages == [{"role": "user", "content": "Write a haiku about rain."}] and prefix == "Haiku:"
    metrics, correct = score(haiku, ["the cat sat on the mat\nmore"], [{"answer": ["the cat sat on the mat"]}])
    assert metrics == {"bleu": pytest.approx(100.0), "n": 1} and correct == [None]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_no_behaviour_depends_on_a_task_name(name):
    """A copy of every record under another name prompts, extracts and scores exactly alike."""
    import dataclasses

    from fusionlab.tasks import extract_answer

    copy = dataclasses.replace(TASKS[name], name="renamed")
    gold = {"number": 3, "equation": 3, "choice": "B"}.get(TASKS[name].extractor, ["Paris"])
    ex = {"id": 0, "question": "Q?", "answer": gold, "choices": {"A": "x", "B": "y"}, "solution": "Step. #### 3"}
    assert build_messages(copy, ex, [ex]) == build_messages(name, ex, [ex])
    outputs = ["The answer is (B). So 3", "Paris\nmore"]
    assert [extract_answer(copy, o) for o in outputs] == [extract_answer(name, o) for o in outputs]
    assert score(copy, outputs, [ex, ex]) == score(name, outputs, [ex, ex])


def test_bad_records_and_missing_fields_are_named():
    from fusionlab.tasks import MATH, TaskDef

    with pytest.raises(FusionlabError, match="extractor='numbr'"):
        TaskDef("x", **{**MATH, "extractor": "numbr"})
    with pytest.raises(FusionlabError, match="'choices'"):
        build_messages("commonsenseqa", {"id": 7, "question": "Q?", "answer": "A"})


def test_number_extraction_follows_eva_first_trigger_rule():
    # EVA scores the first number after the first "the answer is"; later restatements do not count
    assert extract_number("The answer is 28. Step\nThe answer is N = 30") == 28
    assert extract_number("Step 1: 3 + 4 = 7. The answer is 7 apples, so 9 in all") == 7


@pytest.mark.parametrize("text,expected", [
    (" 70 - 27", 43),
    ("X = 70 - 27", 43),  # the reply may repeat the prefix
    (" 70 - 27 = 44", 43),  # the calculator's value, not the model's (wrong) arithmetic
    (" ( 3 + 5 ) * 2.", 16),
    (" 1,000 - 1", 999),
    (" 9 / 4", 2.25),
    (" 4.1 - 2.4\nX = 5", pytest.approx(1.7)),  # the first line only
    (" 43 apples", 43),  # not an expression: the number on the line
    ("", None),
])
def test_extract_equation(text, expected):
    assert extract_equation(text) == expected


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "x + 1", "2 ** 8", "max(1, 2)",
                                        "1 if 1 else 2", "5 / 0", "[1, 2]", "'3' + '4'", "1e308 * 10"])
def test_calculator_refuses_everything_but_arithmetic(expression):
    assert calculate(expression) is None


def test_equation_demonstrations_from_each_annotation_style():
    assert demo_answer("addsub_eq", {"equation": "X = 70 - 27", "answer": 43}) == "X = 70 - 27"
    assert demo_answer("addsub_eq", {"equation": "74 + X = 86", "answer": 12}) == "X = 86 - 74"  # solved for X
    assert demo_answer("addsub_eq", {"equation": "X - 9 = 4", "answer": 13}) == "X = 4 + 9"
    assert demo_answer("svamp_eq", {"equation": "( 76.0 - 25.0 )", "answer": 51}) == "X = ( 76 - 25 )"
    asdiv = load_examples("asdiv_eq", limit=1)[0]  # ASDiv's formula "7+2=9" is read as the equation field
    assert demo_answer("asdiv_eq", asdiv) == "X = 7+2"
    # an annotation that is no expression, or evaluates to another number, shows the answer instead
    assert demo_answer("asdiv_eq", {"equation": "x:The number; 3x-5=10", "answer": 5}) == "X = 5"
    assert demo_answer("addsub_eq", {"equation": "X = 2 + 2", "answer": 5}) == "X = 5"
    msgs, prefix = build_messages("addsub_eq", {"question": "Q?"}, [{"question": "D?", "equation": "X = 1 + 1",
                                                                     "answer": 2}])
    assert [m["content"] for m in msgs] == ["D?", "X = 1 + 1", "Q?"] and prefix == "X ="
    metrics, correct = score("addsub_eq", [" 70 - 27", " 70 + 27", "X = 3 * 3 = 10"], [
        {"id": 0, "question": "q", "answer": 43}, {"id": 1, "question": "q", "answer": 43},
        {"id": 2, "question": "q", "answer": 9}])
    assert correct == [True, False, True] and metrics["accuracy"] == pytest.approx(2 / 3)


def test_dev_test_split_is_seeded_disjoint_and_keeps_demonstrations_out():
    def ids(xs):
        return [x["id"] for x in xs]

    test = task_inputs(TaskConfig(name="addsub_eq", split="test", n_shot=4, dev_size=60))
    dev = task_inputs(TaskConfig(name="addsub_eq", split="dev", n_shot=4, dev_size=60))
    assert len(test.examples) == 395 - 60 and len(dev.examples) == 60 - 4
    assert ids(test.shots) == ids(dev.shots) and ids(test.dev) == ids(dev.examples)  # one split, seen from both sides
    everything = set(ids(test.examples)) | set(ids(dev.examples)) | set(ids(test.shots))
    assert len(everything) == 395  # disjoint parts that cover the data
    assert not set(ids(test.shots)) & (set(ids(test.examples)) | set(ids(dev.examples)))
    assert ids(task_inputs(TaskConfig(name="addsub_eq", split="test", n_shot=4, limit=5)).examples) == ids(test.examples)[:5]
    other = task_inputs(TaskConfig(name="addsub_eq", split="test", n_shot=4, seed=1))
    assert set(ids(other.examples)) != set(ids(test.examples))  # the seed picks the split
    assert ids(test.examples) != sorted(ids(test.examples))  # a permutation, not the file order
    everything = task_inputs(TaskConfig(name="addsub", limit=3))  # split=all: as before
    assert ids(everything.examples) == [1, 2, 3] and everything.dev == []


def test_split_options_are_checked():
    with pytest.raises(FusionlabError, match="task.split='train' is not one of"):
        TaskConfig(split="train")
    with pytest.raises(FusionlabError, match="task.dev_size=4 leaves no dev example"):
        TaskConfig(split="test", n_shot=4, dev_size=4)
    with pytest.raises(FusionlabError, match="task.dev_size=395 leaves no test examples"):
        task_inputs(TaskConfig(name="addsub_eq", split="test", dev_size=395))
