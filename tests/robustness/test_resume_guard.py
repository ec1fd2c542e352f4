"""A resume continues only the run that wrote the checkpoint: a config that changes results is refused, naming
the keys (unless resume_mismatch=allow); neutral keys (more steps, other logging) may change; the W&B run id
is kept in the run dir so a resumed job continues its run."""
from __future__ import annotations

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import RUN_STATE, check_resume, wandb_run_id


@pytest.fixture
def run_dir(compose, tmp_path):
    out = tmp_path / "run"
    check_resume(compose(["+experiment=fusechat_pairwise"], out), out, None)  # the first run records its config
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    return out, ckpt


def test_resume_with_a_changed_lambda_is_refused(compose, run_dir):
    out, ckpt = run_dir
    with pytest.raises(FusionlabError, match=r"distill\.lam: 0\.9 -> 0\.5") as err:
        check_resume(compose(["+experiment=fusechat_pairwise", "distill.lam=0.5"], out), out, str(ckpt))
    assert "resume_mismatch=allow" in str(err.value) and str(ckpt) in str(err.value)
    assert '"lam": 0.9' in (out / RUN_STATE / "config.json").read_text(), "a refused resume records nothing"


def test_neutral_changes_resume_and_allow_overrides(compose, run_dir):
    out, ckpt = run_dir
    check_resume(compose(["+experiment=fusechat_pairwise", "trainer.max_steps=50", "logger=csv"], out), out, str(ckpt))
    check_resume(compose(["+experiment=fusechat_pairwise", "distill.temperature=2.0", "resume_mismatch=allow"], out),
                 out, str(ckpt))
    assert '"temperature": 2.0' in (out / RUN_STATE / "config.json").read_text()


def test_bad_resume_mismatch_value(compose, tmp_path):
    from fusionlab.schema import validate

    with pytest.raises(FusionlabError, match="resume_mismatch='maybe'"):
        validate(compose(["+experiment=fusechat_pairwise", "resume_mismatch=maybe"]))


def test_wandb_run_id_is_stable_per_run_dir(tmp_path):
    first = wandb_run_id(tmp_path / "a")
    assert wandb_run_id(tmp_path / "a") == first and len(first) == 8
    assert wandb_run_id(tmp_path / "b") != first
