"""Bad inputs on the distillation side (issue 16): each is refused with one FusionlabError naming the value and the
fix — at config time where the value alone decides it, else before the expensive step it would break — never a
traceback from inside torch / Lightning and never a silent acceptance. In-process checks first; a few through
``python -m fusionlab.run`` (exit 2, one paragraph, no traceback, nothing written besides the run's own records).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusionlab.distill.config import DataConfig, DistillConfig, FuseChatMergeConfig, PairwiseTarget
from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec
from tests.robustness.test_inputs_fuzz import fusionlab_run

PIVOT = ModelSpec(name="p", source="embedded", path="smollm2_135m")
SOURCE = ModelSpec(name="s", source="embedded", path="gemma3_270m")
TINY_RUN = ["model=tiny_llama", "model@distill.sources.gemma3_270m=tiny_gemma", "distill.mapping.min_vocab_coverage=0",
            "distill.data.limit=4", "distill.data.heldout=2", "distill.data.dev_size=0", "trainer.max_steps=1",
            "distill.baseline=null", "distill.eval.task=null", "logger=csv", "trainer.enable_progress_bar=false"]
RUN_RECORDS = {"metrics.json", "run.log", ".hydra", ".fusionlab"}  # what a refused run may leave in its dir


def _turns(i: int, reply: str = "an answer") -> dict:
    return {"conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": reply}]}


def _jsonl(path: Path, rows: list[dict] | None = None, raw: str | None = None) -> str:
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ conversation files
@pytest.mark.parametrize("rows,raw,needle", [
    # a JSON \ud800 escape: valid JSON, not text a tokenizer takes (was a TypeError traceback from tokenizers)
    (None, "".join(json.dumps({"id": str(i), **_turns(i)}).replace("an answer", "an \\ud800 answer") + "\n"
                   for i in range(4)), "'\\ud800' at character 3"),
    # split.json names conversations by id (was accepted: the split listed 'same' six times)
    ([{"id": "same", **_turns(i)} for i in range(4)], None, "Line 2 of"),
    # an object as an id (was str()-ed into "{'a': 0}")
    ([{"id": {"a": i}, **_turns(i)} for i in range(4)], None, "`id` must be a string or an integer, got {'a': 0}"),
], ids=["lone surrogate", "repeated id", "object id"])
def test_bad_conversation_lines_are_refused_when_the_config_is_built(tmp_path, rows, raw, needle):
    path = _jsonl(tmp_path / "c.jsonl", rows, raw)
    with pytest.raises(FusionlabError, match="c.jsonl") as err:
        DataConfig(path=path, heldout=1)
    assert needle in str(err.value)


# --------------------------------------------------------------------------------------- distill config
@pytest.mark.parametrize("kw,needle", [
    ({"sources": {"s": SOURCE, "again": ModelSpec(name="other", source="embedded", path="gemma3_270m")}},
     "distill.sources.again (embedded 'gemma3_270m') is the same model as distill.sources.s"),
    ({"sources": {"s": ModelSpec(name="s", source="embedded", path="smollm2_135m", dtype="bfloat16")}},
     "is the same model as the pivot"),
    ({"mode": "implicit", "implicit": {"scorer_model": "nosuch"}}, "distill.implicit.scorer_model='nosuch'"),
])
def test_distill_config_refuses_sources_that_add_nothing_and_unknown_scorers(kw, needle):
    from fusionlab.distill.implicit import ImplicitConfig

    if "implicit" in kw:
        kw = {**kw, "implicit": ImplicitConfig(**kw["implicit"])}
    with pytest.raises(FusionlabError) as err:
        DistillConfig(**{"pivot": PIVOT, "sources": {"s": SOURCE}, **kw})
    assert needle in str(err.value)


def test_random_sources_of_another_seed_are_other_models():
    tiny = {"source": "random", "tokenizer": "smollm2_135m", "config": {"model_type": "llama"}}
    DistillConfig(pivot=ModelSpec(name="p", **tiny), sources={"s": ModelSpec(name="s", seed=1, **tiny)})


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b"garbage\n") and p, "is not a Lightning checkpoint"),  # was an UnpicklingError
    (lambda p: p.mkdir() or (p / "x.ckpt").touch() or p, "is a directory, not a checkpoint (it holds ['x.ckpt']"),
])
def test_a_resume_path_that_is_no_checkpoint_fails_at_config_time(tmp_path, make, needle):
    path = make(tmp_path / "r.ckpt")
    with pytest.raises(FusionlabError, match="distill.resume=") as err:
        DistillConfig(pivot=PIVOT, sources={"s": SOURCE}, resume=str(path))
    assert needle in str(err.value)


def test_a_truncated_checkpoint_is_refused_and_a_whole_or_sharded_one_accepted(tmp_path):
    whole = tmp_path / "whole.ckpt"
    with zipfile.ZipFile(whole, "w") as z:  # torch.save's format: a zip archive
        z.writestr("archive/data.pkl", b"x" * 4096)
    (tmp_path / "cut.ckpt").write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(FusionlabError, match="cut.ckpt' is not a Lightning checkpoint"):
        DistillConfig(pivot=PIVOT, sources={"s": SOURCE}, resume=str(tmp_path / "cut.ckpt"))
    (tmp_path / "ds.ckpt").mkdir()
    (tmp_path / "ds.ckpt" / "latest").write_text("checkpoint")  # DeepSpeed's checkpoint directory
    for ok in (whole, tmp_path / "ds.ckpt"):
        assert DistillConfig(pivot=PIVOT, sources={"s": SOURCE}, resume=str(ok)).resume_checkpoint(tmp_path) == str(ok)


# ------------------------------------------------------------------------------------------ fusechat_merge
def _target(root: Path, run: str, **config) -> str:
    d = root / run / "model"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, **config}))
    return str(d)


def test_merge_targets_twice_or_of_two_architectures_are_refused(tmp_path):
    a = _target(tmp_path, "a")
    with pytest.raises(FusionlabError, match="lists .*a/model' twice"):  # was merged once, silently
        FuseChatMergeConfig(targets=[a, str(Path(a).parent / ".." / "a" / "model")])
    with pytest.raises(FusionlabError, match="different architectures .*hidden_size=64.*hidden_size=32"):
        FuseChatMergeConfig(targets=[a, _target(tmp_path, "b", hidden_size=32)])


def test_merge_targets_of_one_run_name_are_all_kept(tmp_path):
    """/x/run/model and /y/run/model were both named 'run': one silently replaced the other."""
    paths = [_target(tmp_path / d, n) for d, n in (("x", "run"), ("y", "run"), ("z", "pivot"))]
    assert list(FuseChatMergeConfig(targets=paths).named_targets()) == ["run", "run_2", "pivot_2"]


def test_a_pairwise_targets_bad_rows_name_the_target(tmp_path):
    from fusionlab.distill.pipeline import target_config

    dc = DistillConfig(pivot=PIVOT, sources={"s": SOURCE}, data=DataConfig(heldout=2))
    with pytest.raises(FusionlabError, match=r"^fusechat_merge.pairwise.half_a \(rows \[1000, 2000\]"):
        target_config(dc, "half_a", PairwiseTarget(rows=[1000, 2000]), tmp_path)


# ---------------------------------------------------------------------- pipeline checks before model time
@pytest.mark.parametrize("make,needle", [
    (lambda p: p.touch() or p, "is a file, not a directory"),
    (lambda p: p.touch() or p / "sub", "cannot be created (Not a directory)"),
])
def test_an_unusable_cache_dir_is_named(tmp_path, make, needle):
    from fusionlab.distill.pipeline import _cache_root

    with pytest.raises(FusionlabError, match="distill.cache_dir=") as err:
        _cache_root(make(tmp_path / "f"), "distill.cache_dir")
    assert needle in str(err.value)


def test_topk_beyond_a_vocabulary_and_val_check_interval_beyond_an_epoch_are_refused():
    from fusionlab.distill.pipeline import _check_topk, _check_val_check_interval

    with pytest.raises(FusionlabError, match="distill.topk=300 is more than the 200 tokens of source 'g'"):
        _check_topk(300, {"the pivot": [0] * 400, "source 'g'": [0] * 200})
    _check_topk(200, {"the pivot": [0] * 400, "source 'g'": [0] * 200})
    trainer = SimpleNamespace(val_check_interval=4, check_val_every_n_epoch=1, limit_val_batches=1.0, world_size=1)
    with pytest.raises(FusionlabError, match="trainer.val_check_interval=4 is more than the 3 training batches"):
        _check_val_check_interval(trainer, samples=6, batch_size=2)
    _check_val_check_interval(trainer, samples=8, batch_size=2)
    _check_val_check_interval(SimpleNamespace(**{**vars(trainer), "check_val_every_n_epoch": None}), 6, 2)


# -------------------------------------------------------------------------------------------- the real CLI
def test_cli_refuses_a_lone_surrogate_before_any_model_loads(tmp_path):
    rows = "".join(json.dumps({"id": str(i), **_turns(i)}).replace("an answer", "\\udc80") + "\n" for i in range(6))
    path = _jsonl(tmp_path / "c.jsonl", raw=rows)
    run_dir = tmp_path / "run"
    proc = fusionlab_run(["+experiment=fusechat_pairwise", *TINY_RUN, f"distill.data.path={path}"], run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("fusionlab: error: ") and "'\\udc80'" in proc.stderr and path in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert {p.name for p in run_dir.iterdir()} <= RUN_RECORDS


def test_cli_refuses_topk_larger_than_the_vocabulary_before_extraction(tmp_path):
    run_dir = tmp_path / "run"
    proc = fusionlab_run(["+experiment=fusechat_pairwise", *TINY_RUN, "distill.topk=100000",
                          f"distill.cache_dir={tmp_path / 'cache'}"], run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "distill.topk=100000 is more than the 49152 tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name for p in run_dir.iterdir()} <= RUN_RECORDS
    assert not any((tmp_path / "cache").iterdir())  # no representation was extracted


def test_resume_auto_checks_the_last_checkpoint_it_would_continue(tmp_path):
    """A last.ckpt cut short by a kill or a full disk was handed to Lightning as is (torch's zip error mid-run)."""
    dc = DistillConfig(pivot=PIVOT, sources={"s": SOURCE}, resume="auto")
    assert dc.resume_checkpoint(tmp_path) is None  # nothing to continue: a fresh fit
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    with zipfile.ZipFile(last, "w") as z:
        z.writestr("archive/data.pkl", b"x" * 4096)
    assert dc.resume_checkpoint(tmp_path) == str(last)
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(FusionlabError, match=r"distill.resume='auto \(.*last.ckpt\)' is not a Lightning checkpoint"):
        dc.resume_checkpoint(tmp_path)
