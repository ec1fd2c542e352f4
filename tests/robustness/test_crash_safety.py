"""kill -9 (by PID) in the middle of real writes: no half-written final output is ever visible, the next run
cleans the dead process's temp files and produces exactly what an uninterrupted run produces.

Every atomic write pauses at ``write:<target>`` when ``FUSIONLAB_TEST_PAUSE`` names it (a real sleep in the
real code path, its data complete and not yet renamed), so the kill lands at a known point."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

MERGE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from tests.merge.conftest import tiny_state, write_model
    from fusionlab.merge import MergeConfig, merge
    root = Path(sys.argv[1])
    for seed in (0, 1):
        if not (root / f"m{seed}" / "config.json").exists():
            write_model(root / f"m{seed}", tiny_state(seed))
    out = sys.argv[2]
    merge(MergeConfig(method="linear", models=[str(root / "m0"), str(root / "m1")], parameters={"weight": 0.5},
                      output=out, progress=False))
""")


def _run(script: str, args: list[str], pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("FUSIONLAB_TEST_PAUSE", None)
    if pause:
        env["FUSIONLAB_TEST_PAUSE"] = pause
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_at_pause(proc: subprocess.Popen, stage: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if f"paused {stage}" in line:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert time.monotonic() < deadline, f"never reached {stage}"
    pytest.fail(f"exited with {proc.wait()} before reaching {stage}: {proc.stderr.read()[-2000:]}")


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_merge_killed_before_rename_leaves_nothing_and_reruns_identically(tmp_path):
    out = tmp_path / "merged"
    proc = _run(MERGE, [str(tmp_path), str(out)], pause="write:merged")
    _kill_at_pause(proc, "write:merged")
    assert not out.exists(), "no half-written final output"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert leftovers, "the dead process's temp dir is there (the kill really landed mid-write)"

    rerun = _run(MERGE, [str(tmp_path), str(out)])
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")], "stale temp cleaned"
    reference = _run(MERGE, [str(tmp_path), str(tmp_path / "reference")])
    assert reference.wait() == 0, reference.stderr.read()[-2000:]
    ours, ref = _files(out), _files(tmp_path / "reference")
    record = "fusionlab_merge.json"  # the merge record names its own output dir
    assert ours.pop(record).replace(b"/merged", b"/reference") == ref.pop(record)
    assert ours == ref and any(name.endswith(".safetensors") for name in ours)


def test_metrics_write_killed_keeps_the_previous_file(tmp_path):
    """A killed atomic file write (metrics.json of a re-run) leaves the previous complete file, never a partial one."""
    script = "import sys; from fusionlab.io import write_json; write_json(sys.argv[1], {'run': int(sys.argv[2])})"
    path = tmp_path / "metrics.json"
    assert _run(script, [str(path), "1"]).wait() == 0
    proc = _run(script, [str(path), "2"], pause="write:metrics.json")
    _kill_at_pause(proc, "write:metrics.json")
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"run":1}'
    assert _run(script, [str(path), "3"]).wait() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"], "the stale temp file is cleaned"


@pytest.mark.slow
def test_embedded_conversion_killed_then_rebuilt(tmp_path):
    """The real SmolLM2 conversion into an empty cache, killed before its rename; the next run converts it again."""
    script = "from fusionlab.models import embedded_checkpoint; print(embedded_checkpoint('smollm2_135m'))"
    env_cache = {"FUSIONLAB_CACHE": str(tmp_path / "cache")}
    os.environ.update(env_cache)
    try:
        proc = _run(script, [], pause="write:smollm2_135m-v1")
        _kill_at_pause(proc, "write:smollm2_135m-v1", timeout=900)
        models = tmp_path / "cache" / "models"
        assert not (models / "smollm2_135m-v1").exists()
        assert _run(script, []).wait() == 0
        from fusionlab.io import manifest_problem

        assert manifest_problem(models / "smollm2_135m-v1") is None
        assert [p.name for p in models.iterdir()] == ["smollm2_135m-v1"]
    finally:
        os.environ.pop("FUSIONLAB_CACHE")


# --- the stages of issue 16 (5) not covered above: alignment build, representation extraction, a fit ----------
# Each script is run as is by every process of its test (the uninterrupted reference runs beside the killed one).

ALIGN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from tests.align.test_align import _Head, _word_tokenizer
    from fusionlab.align import align
    main_words = ["[u]", "cat", "dog", "house", "mouse", "the", "zebra"]
    aux_words = ["[v]", "cats", "hose", "dig", "cat", "the", "zebr"]
    torch.manual_seed(0)
    aux, main = _Head(len(aux_words)), _Head(len(main_words))
    a = align(aux, _word_tokenizer(aux_words), main, _word_tokenizer(main_words), "mined", cache_dir=sys.argv[1])
    print(a.key)
""")


def _alignment_entry(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata less the build time) of an alignment cache file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stats = json.loads(meta.pop("stats"))
    stats.pop("build_s")  # wall time of the build: the one field two builds never share
    return tensors, {**meta, "stats": stats}


def test_alignment_build_killed_before_rename_leaves_no_entry_and_rebuilds_identically(tmp_path):
    reference = _run(ALIGN, [str(tmp_path / "reference")])
    assert reference.wait() == 0, reference.stderr.read()[-2000:]
    key = reference.stdout.read().split()[-1]
    cache = tmp_path / "cache"
    proc = _run(ALIGN, [str(cache)], pause=f"write:{key}.safetensors")
    _kill_at_pause(proc, f"write:{key}.safetensors")
    assert not (cache / f"{key}.safetensors").exists(), "no entry visible"
    assert [p.name for p in cache.iterdir()][0].startswith(f".{key}.safetensors."), "the kill landed mid-write"

    rerun = _run(ALIGN, [str(cache)])
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert [p.name for p in cache.iterdir()] == [f"{key}.safetensors"], "stale temp cleaned"
    (ours, ours_meta), (ref, ref_meta) = (_alignment_entry(d / f"{key}.safetensors") for d in (cache, tmp_path / "reference"))
    assert ours_meta == ref_meta and ours.keys() == ref.keys() == {"cols", "vals"}
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and ours[name].equal(ref[name]), name


EXTRACT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from fusionlab.distill.config import DataConfig, DistillConfig, MappingConfig
    from fusionlab.distill.pipeline import prepare
    from fusionlab.models import ModelSpec
    TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    def spec(name, seed):
        return ModelSpec(name=name, source="random", tokenizer="smollm2_135m", seed=seed, config=TINY)
    prepare(DistillConfig(pivot=spec("pivot", 0), sources={"other": spec("other", 1)}, topk=4, shard_size=2,
                          data=DataConfig(heldout=2, limit=6, max_length=48), cache_dir=sys.argv[1],
                          mapping=MappingConfig(min_vocab_coverage=0)))
""")


def test_representation_extraction_killed_mid_way_resumes_to_the_same_fused_set(tmp_path):
    """Killed while the pivot's second shard (of 3) is being renamed into place: the rerun keeps shard 0, redoes
    shard 1 and the rest, extracts the source and builds the fused set — every file equal to an uninterrupted run's."""
    reference = _run(EXTRACT, [str(tmp_path / "reference")])  # beside the killed run: the cores are shared anyway
    cache = tmp_path / "cache"
    proc = _run(EXTRACT, [str(cache)], pause="write:shard-00001.safetensors")
    _kill_at_pause(proc, "write:shard-00001.safetensors")
    pivot = cache / "pivot"
    assert sorted(p.name for p in pivot.iterdir() if not p.name.startswith(".")) == \
        ["meta.json", "shard-00000.json", "shard-00000.safetensors"], "only complete shards are visible"
    assert any(p.name.startswith(".shard-00001.safetensors.") for p in pivot.iterdir()), "killed mid-write"
    assert not list(cache.glob("source-*")) and not list(cache.glob("fused-*"))

    rerun = _run(EXTRACT, [str(cache)])
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert reference.wait() == 0, reference.stderr.read()[-2000:]
    ours, ref = _files(cache), _files(tmp_path / "reference")
    assert not [name for name in ours if "/." in f"/{name}"], "stale temp cleaned"
    done, done_ref = (json.loads(files.pop("pivot/done.json")) for files in (ours, ref))
    assert (done.pop("shards_skipped"), done_ref.pop("shards_skipped")) == (1, 0), "the rerun kept the complete shard"
    assert done == done_ref  # the counts, less that resume bookkeeping field
    assert ours == ref, "every shard, marker and the fused set equal the uninterrupted run's bytes"
    assert sum(n.startswith("fused-") and n.endswith(".safetensors") for n in ours) == 1
    assert any(n.startswith("source-other-") and n.endswith("/done.json") for n in ours)


FIT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    import lightning as L
    from safetensors.torch import save_file
    from tests.distill.test_distill_fit import LossLog, make, records
    from fusionlab.distill.data import FuseDataModule
    from fusionlab.io import atomic_path, pause_for_tests, write_json

    class PauseAtStepStart(L.Callback):  # FUSIONLAB_TEST_PAUSE=fit:step-3: after step 3 and its checkpoint
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pause_for_tests(f"fit:step-{trainer.global_step}")

    out = Path(sys.argv[1])
    last = out / "ckpt" / "last.ckpt"
    losses = LossLog()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_last=True,
                                                      save_top_k=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, use_distributed_sampler=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[losses, checkpoints, PauseAtStepStart()])
    module = make()
    trainer.fit(module, datamodule=FuseDataModule(records(), batch_size=2, seed=3),
                ckpt_path=str(last) if last.exists() else None)
    with atomic_path(out / "final.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(tmp))
    write_json(out / "losses.json", losses.losses)
""")


def test_fit_killed_after_a_checkpoint_resumes_to_the_same_weights_and_losses(tmp_path):
    """A distill fit (FuseLightningModule on a tiny random model, a checkpoint every step) killed by PID after its
    step-3 checkpoint; the rerun resumes there and ends with the uninterrupted run's weights and losses."""
    from safetensors.torch import load_file

    reference = _run(FIT, [str(tmp_path / "reference")])
    run_dir = tmp_path / "run"
    proc = _run(FIT, [str(run_dir)], pause="fit:step-3")
    _kill_at_pause(proc, "fit:step-3")
    assert (run_dir / "ckpt" / "last.ckpt").is_file() and not (run_dir / "final.safetensors").exists()

    rerun = _run(FIT, [str(run_dir)])
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert reference.wait() == 0, reference.stderr.read()[-2000:]
    resumed, full = (json.loads((d / "losses.json").read_text()) for d in (run_dir, tmp_path / "reference"))
    assert sorted(map(int, resumed)) == [4, 5, 6], "the rerun resumed after step 3, not from scratch"
    assert resumed == {k: full[k] for k in resumed}
    ours, ref = load_file(run_dir / "final.safetensors"), load_file(tmp_path / "reference" / "final.safetensors")
    assert ours.keys() == ref.keys() and all(ours[k].equal(ref[k]) for k in ref)
