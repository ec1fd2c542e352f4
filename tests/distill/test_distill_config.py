"""Typed distill / fusechat_merge configs: bad values fail when the config is built, before any model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusionlab.align.mapping import MappingConfig
from fusionlab.distill.config import DataConfig, DistillConfig, FuseChatMergeConfig, PairwiseTarget
from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec

REPO = Path(__file__).resolve().parents[2]
PIVOT = ModelSpec(name="p", source="embedded", path="smollm2_135m")
SOURCE = ModelSpec(name="s", source="embedded", path="gemma3_270m")


def config(**kw) -> DistillConfig:
    return DistillConfig(**{"pivot": PIVOT, "sources": {"s": SOURCE}, **kw})


@pytest.mark.parametrize("kw,match", [
    ({"lam": 1.5}, r"distill\.lam=1\.5 must lie in \[0, 1\]"),
    ({"lam": -0.1}, r"distill\.lam=-0\.1"),
    ({"temperature": 0.0}, r"distill\.temperature=0\.0 must be > 0"),
    ({"loss_type": "mse"}, r"loss_type 'mse'.*\['ce', 'kl'\]"),
    ({"fusion_mode": "maximum"}, r"fusion_mode 'maximum'.*min_ce"),
    ({"topk": 0}, r"distill\.topk=0 must be >= 1"),
    ({"batch_size": 0}, r"distill\.batch_size=0"),
    ({"extract_batch_size": 0}, r"distill\.extract_batch_size=0"),
    ({"shard_size": 0}, r"distill\.shard_size=0"),
    ({"pairwise_source": "other"}, r"pairwise_source='other' is not one of the sources \['s'\]"),
    ({"sources": {}}, r"distill\.sources is empty"),
    ({"pivot": "smollm2_135m"}, r"distill\.pivot='smollm2_135m' is not a model config"),
    ({"resume": "/no/such.ckpt"}, r"distill\.resume='/no/such\.ckpt' does not exist"),
])
def test_bad_distill_values_are_named(kw, match):
    with pytest.raises(FusionlabError, match=match):
        config(**kw)


@pytest.mark.parametrize("cls,kw,match", [
    (DataConfig, {"path": "/no/such.jsonl"}, r"'/no/such\.jsonl' does not exist"),
    (DataConfig, {"limit": 0}, r"distill\.data\.limit=0 must be >= 1 \(or null\)"),
    (DataConfig, {"max_length": 1}, r"distill\.data\.max_length=1"),
    (DataConfig, {"val_size": -1}, r"distill\.data\.val_size=-1"),
    (MappingConfig, {"method": "fuzzy"}, r"distill\.mapping\.method='fuzzy'.*\['em', 'mined', 'ms'\]"),
    (MappingConfig, {"min_exact_rate": 2.0}, r"min_exact_rate=2\.0 must lie in \[0, 1\]"),
    (MappingConfig, {"substring_weight": -1.0}, r"substring_weight=-1\.0"),
    (PairwiseTarget, {"rows": [0, 1, 2]}, r"rows=\[0, 1, 2\] must be \[start, stop\]"),
    (FuseChatMergeConfig, {}, r"needs targets"),
    (FuseChatMergeConfig, {"targets": ["/no/such/dir"]}, r"'/no/such/dir' is not an HF checkpoint dir"),
])
def test_bad_nested_values_are_named(cls, kw, match):
    with pytest.raises(FusionlabError, match=match):
        cls(**kw)


def test_shipped_data_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative to the checkout when not relative to the cwd
    from fusionlab.distill.conversations import find_conversations, load_conversations

    assert find_conversations(DataConfig().path) == REPO / "fusionlab" / "data" / "chat" / "alpaca_gpt4_500.jsonl"
    assert len(load_conversations(DataConfig().path, limit=3)) == 3


def test_resume_settings(tmp_path):
    for off in ("false", "False", "none", None):
        assert config(resume=off).resume_checkpoint(tmp_path) is None
    assert config().resume_checkpoint(tmp_path) is None  # auto, nothing to resume from yet
    (tmp_path / "checkpoints").mkdir()
    import zipfile

    with zipfile.ZipFile(tmp_path / "checkpoints" / "last.ckpt", "w") as z:  # torch.save's format (an explicit path is checked)
        z.writestr("last/data.pkl", b"")
    assert config().resume_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert config(resume=str(tmp_path / "checkpoints" / "last.ckpt")).resume_checkpoint(Path("/elsewhere")) == \
        str(tmp_path / "checkpoints" / "last.ckpt")


def test_mapping_is_its_own_group_and_align_method_keeps_only_eva(compose):
    cfg = compose(["+experiment=fusechat_pairwise", "distill/mapping=mined", "distill.mapping.one_to_one=false"])
    assert cfg.distill.mapping.method == "mined" and cfg.distill.mapping.one_to_one is False
    assert cfg.align_method is None
    assert sorted(p.stem for p in (REPO / "conf" / "align_method").glob("*.yaml")) == ["exact", "mined", "vecmap_csls"]
    with pytest.raises(Exception, match="fusechat_ms"):
        compose(["+experiment=fusechat_pairwise", "+align_method=fusechat_ms"])


def test_pairwise_target_settings(tmp_path):
    from fusionlab.distill.pipeline import target_config

    dc = config(cache_dir=str(tmp_path / "cache"), export_model=False)
    target = PairwiseTarget(rows=[2, 5], distill={"pairwise_source": "s", "data": {"max_length": 64}})
    tc = target_config(dc, "a", target, tmp_path / "a")
    assert tc.pairwise_source == "s" and tc.data.max_length == 64 and tc.export_model is True
    assert tc.cache_dir == str(tmp_path / "cache" / "a")  # one data set per cache dir
    # rows index the TRAINING conversations (the held-out split is the same for every target)
    assert tc.data.path == dc.data.path and (tc.data.start, tc.data.limit) == (2, 3)
    from fusionlab.distill.conversations import load_conversations, split_conversations

    train, heldout, _ = split_conversations(load_conversations(dc.data.path), dc.data.heldout)
    picked = tc.data.train_slice(train)
    assert [c["id"] for c in picked] == [c["id"] for c in train[2:5]]
    assert not {c["id"] for c in picked} & {c["id"] for c in heldout}
    with pytest.raises(FusionlabError, match=r"fusechat_merge\.pairwise\.a\.distill\.lamda"):
        target_config(dc, "a", PairwiseTarget(distill={"lamda": 0.5}), tmp_path / "a")
    with pytest.raises(FusionlabError, match=r"fusechat_merge\.pairwise\.a\.distill\.data\.pth"):
        target_config(dc, "a", PairwiseTarget(distill={"data": {"pth": "x"}}), tmp_path / "a")
    with pytest.raises(FusionlabError, match="lam=2"):  # values are checked again
        target_config(dc, "a", PairwiseTarget(distill={"lam": 2}), tmp_path / "a")
    with pytest.raises(FusionlabError, match="selects no conversation"):
        target_config(dc, "a", PairwiseTarget(rows=[6, 6]), tmp_path / "a")


@pytest.mark.parametrize("override,named", [
    ("distill.lam=1.5", "distill.lam=1.5"),
    ("distill.fusion_mode=maximum", "'maximum'"),
    ("distill/mapping=fuzzy", "fuzzy"),
    ("distill.topk=abc", "distill.topk"),
])
def test_cli_bad_distill_value_exits_2_without_loading_a_model(tmp_path, override, named):
    cache = tmp_path / "cache"  # where the pipeline would put representations: it must not even start
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "FUSIONLAB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", override,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fusionlab: error:" in proc.stderr and named in proc.stderr and "Traceback" not in proc.stderr
    assert not cache.exists() and not (tmp_path / "run" / "checkpoints").exists()  # no model converted or run
