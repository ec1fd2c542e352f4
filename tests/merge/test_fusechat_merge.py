"""+experiment=fusechat_merge end to end on tiny random models (pivot tiny_llama, source tiny_gemma)."""
from __future__ import annotations

import pytest
import torch

from .conftest import load_dir

TINY = ["model=tiny_llama", "model@distill.sources.gemma3_270m=tiny_gemma", "logger=csv",
        "distill.data.max_length=48", "distill.shard_size=4", "trainer.max_steps=1",
        "trainer.enable_progress_bar=false", "merge.progress=false", "distill.data.heldout=6",
        "distill.eval.task_limit=2",
        "distill.mapping.min_vocab_coverage=0",  # random tiny models: their top-k ids are noise
        "fusechat_merge.pairwise.half_a.rows=[0,3]", "fusechat_merge.pairwise.half_b.rows=[3,6]"]


def test_fusechat_merge_makes_targets_then_sce_merges_them(compose, tmp_path):
    from fusionlab.merge.methods import sce
    from fusionlab.run import run

    out = tmp_path / "run"
    m = run(compose(["+experiment=fusechat_merge", *TINY, f"distill.cache_dir={tmp_path / 'cache'}",
                     "callbacks=[default,chat_vector]",
                     "callbacks.chat_vector.max_length=16", "callbacks.chat_vector.limit=2",
                     "callbacks.model_checkpoint.every_n_train_steps=1"], out))
    assert m["merge_method"] == "sce" and m["fusion_targets"] == 2
    for name in ("half_a", "half_b"):
        sub = out / "pairwise" / name
        assert (sub / "model" / "config.json").exists() and (sub / "checkpoints" / "last.ckpt").exists()
        assert m[f"pairwise/{name}/fit/steps"] == 1
        split = __import__("json").loads((sub / "split.json").read_text())
        assert len(split["train"]) == 3 and not set(split["train"]) & set(split["heldout"])  # its half of the rows
        assert (sub / "merged" / "step000001" / "config.json").exists()  # the chat_vector callback ran inside
        assert (tmp_path / "cache" / name / "pivot" / "done.json").exists()  # a cache dir per target
    for label in ("pivot", "half_a", "half_b", "merged"):  # FuseChat's table: all on the same held-out set
        assert m[f"heldout/ce/{label}_low"] <= m[f"heldout/ce/{label}"] <= m[f"heldout/ce/{label}_high"]
        assert 0 <= m[f"heldout/accuracy/{label}"] <= 1
    d = m["heldout/ce_diff/merged_minus_pivot"]
    assert d == pytest.approx(m["heldout/ce/merged"] - m["heldout/ce/pivot"])  # paired: same conversations
    assert "heldout/ce_diff/merged_minus_half_a" in m and "heldout/ce_diff/half_b_minus_pivot" in m
    # each target's own distill run scored it on the same held-out conversations as the final table
    assert m["pairwise/half_a/heldout/ce/fused"] == pytest.approx(m["heldout/ce/half_a"], rel=1e-5)
    # the merge is SCE(base = pivot, targets), tensor by tensor
    pivot, a, b, merged = (load_dir(out / "pivot"), load_dir(out / "pairwise" / "half_a" / "model"),
                           load_dir(out / "pairwise" / "half_b" / "model"), load_dir(out / "merged"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], pivot[name]) and not torch.equal(a[name], b[name])
    for k in merged:
        torch.testing.assert_close(merged[k], sce(pivot[k], [a[k], b[k]], select_topk=1.0), rtol=0, atol=0)

    # given targets: no distillation, same merge
    out2 = tmp_path / "run2"
    targets = f"[{out / 'pairwise' / 'half_a' / 'model'},{out / 'pairwise' / 'half_b' / 'model'}]"
    m2 = run(compose(["+experiment=fusechat_merge", *TINY, f"fusechat_merge.targets={targets}",
                      "fusechat_merge.eval=null", "objective=null"], out2))
    assert not (out2 / "pairwise").exists() and m2["fusion_targets"] == 2
    again = load_dir(out2 / "merged")
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_bad_fusechat_merge_options(compose, tmp_path):
    from fusionlab.errors import FusionlabError
    from fusionlab.run import run

    with pytest.raises(FusionlabError, match="not an HF checkpoint dir"):
        run(compose(["+experiment=fusechat_merge", *TINY, f"fusechat_merge.targets=[{tmp_path}]"], tmp_path / "a"))
    with pytest.raises(FusionlabError, match=r"unknown option.*\['steps'\].*pairwise\.half_a"):
        run(compose(["+experiment=fusechat_merge", *TINY, "+fusechat_merge.pairwise.half_a.steps=3"], tmp_path / "b"))
