"""The prepared GPU check (experiments/gpu, issue 17) on its CPU path, so it cannot rot while no GPU is lent:
the whole script at tiny sizes, and the pieces whose mistakes would silently corrupt GPU figures."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = REPO / "experiments" / "gpu"
BUDGET_S = 360
sys.path.insert(0, str(GPU_DIR))

import checks  # noqa: E402
from synthetic_tokenizer import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.perf_counter()
    # a budget with room for shared, loaded cores (each part stops at its share of it, so a quiet run takes
    # far less); the script's own deadline keeps the total under it
    proc = subprocess.run([sys.executable, str(GPU_DIR / "run_all.py"), "--device", "cpu", "--out", str(out),
                           "--budget-s", str(BUDGET_S)], cwd=REPO, capture_output=True, text=True,
                          timeout=BUDGET_S + 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, time.perf_counter() - t0


def test_every_part_runs_on_cpu_and_records_what_it_skipped(cpu_run):
    results, out, seconds = cpu_run
    parts = results["parts"]
    assert {n: parts[n]["status"] for n in ("distill", "eva", "merge", "erank")} == dict.fromkeys(
        ("distill", "eva", "merge", "erank"), "ok"), {n: parts[n].get("traceback") for n in parts}
    skipped = "\n".join(results["skipped"])
    for strategy in ("fsdp", "deepspeed_z2", "deepspeed_z3_offload"):  # GPU-only strategies: named, with the reason
        assert f"distill: {strategy}: needs a CUDA GPU" in skipped
    assert "hf_static_compiled" in skipped and "merge.device=cuda: no GPU" in skipped
    assert results["machine"]["device"] == "cpu" and results["total_s"] < BUDGET_S
    summary = (out / "summary.md").read_text()
    assert "## Distillation" in summary and "## Targets (issue 17)" in summary and "| cpu | True |" in summary


def test_distill_fits_and_resumes_through_the_cli(cpu_run):
    rec = cpu_run[0]["parts"]["distill"]["strategies"]["cpu"]
    steps, resume = checks.PROFILES["cpu"]["distill"]["steps"], checks.PROFILES["cpu"]["distill"]["resume_steps"]
    fit, res = rec["fit"], rec["resume"]
    assert rec["ok"] and fit["rc"] == 0 and res["rc"] == 0
    assert fit["job_steps"] == fit["steps"] == steps and fit["job_resumed"] is False
    # the resumed run starts at the checkpoint: only the extra steps run, and the job says it resumed
    assert res["job_resumed"] is True and res["job_steps"] == steps + resume and res["steps"] == resume
    assert fit["loss_finite"] and res["loss_finite"] and 0 < fit["loss_first"] < 20
    assert fit["tokens_per_s"] > 0 and fit["mfu"] is None  # no MFU without a GPU's peak


def test_eva_ensemble_members_and_hf_generate_are_measured(cpu_run):
    pair = cpu_run[0]["parts"]["eva"]["pairs"]["tiny"]
    assert pair["main"]["vocab"] != pair["aux"]["vocab"]  # different vocabularies: the EVA case
    for batch in ("1", "2"):
        r = pair["batches"][batch]
        for key in ("main_tok_s", "aux_tok_s", "ensemble_tok_s", "main_hf_dynamic_tok_s", "main_hf_static_tok_s",
                    "aux_hf_dynamic_tok_s", "aux_hf_static_tok_s"):
            assert r[key] > 0, key
        expected = (1 / r["main_tok_s"] + 1 / r["aux_tok_s"]) * r["ensemble_tok_s"]
        assert r["ensemble_speed_vs_members"] == pytest.approx(expected, rel=1e-2)
        assert r["ensemble_static_bound_from"] == "hf_static"


def test_merges_are_compared_and_erank_matches_an_independent_svd(cpu_run):
    parts = cpu_run[0]["parts"]
    for method in ("ties", "sce"):
        same = parts["merge"]["methods"][method]["same_results"]
        assert same["same"] and same["identical_frac"] == 1.0 and same["tensors"] > 0
    er = parts["erank"]
    assert er["fusionlab_abs_err"] < 1e-8 * er["truth_entropy"]  # float64 eigvalsh vs float64 SVD
    assert er["reference_abs_err"] < 1e-3 * er["truth_entropy"]  # the float32 reference is close, not exact
    targets = {t["target"]: t for t in cpu_run[0]["targets"]}
    assert all(t["met"] is None for name, t in targets.items() if "MFU" in name or "eRank" in name)  # GPU-only


@pytest.mark.parametrize("style,size", [("byte_level", 700), ("sentencepiece", 600)])
def test_synthetic_tokenizers_have_the_exact_size_and_round_trip(tmp_path, style, size):
    from transformers import AutoTokenizer

    from fusionlab.align import token_bytes

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / style, size, style))
    assert len(tok) == size
    text = "Making crepes: 1/2 cup milk, naïve café — 😀 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    table = token_bytes(tok, size)  # what EVA's text synchronisation reads: every id's bytes
    assert b"".join(table[i] for i in ids) == text.encode()


def test_matmul_params_count_every_linear_weight():
    model = checks.build_model(dict(checks.TINY, tie_word_embeddings=False), 300, "cpu", "float32")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert checks.matmul_params(checks.TINY, 300) == linear


def test_same_results_detects_a_difference(tmp_path):
    from safetensors.torch import save_file

    x = torch.linspace(-1, 1, 100)
    for name, t in (("a", x), ("b", x.clone()), ("c", torch.where(torch.arange(100) == 7, x + 0.1, x))):
        (tmp_path / name).mkdir()
        save_file({"w": t}, str(tmp_path / name / "model.safetensors"))
    assert checks._same_results(tmp_path / "a", tmp_path / "b", "cpu")["same"] is True
    diff = checks._same_results(tmp_path / "a", tmp_path / "c", "cpu")
    assert diff["same"] is False and diff["identical_frac"] == 0.99


def test_time_guards_stop_a_part_and_kill_a_command(tmp_path):
    deadline = checks.Deadline(0.3)
    t0 = time.perf_counter()
    with pytest.raises(checks.PartTimeout):
        with checks.armed(deadline):
            while True:
                time.sleep(0.01)
    assert time.perf_counter() - t0 < 2
    res = checks.run_command(["sleep", "30"], 0.5, tmp_path / "sleep.log", env={"PATH": "/usr/bin:/bin"})
    assert res["rc"] == "timeout" and res["seconds"] < 5
