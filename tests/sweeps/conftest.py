"""A real multirun, shared by the sweep, report and notebook tests (CLI runs cost ~10 s of imports each)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TINY = ["+experiment=eval_addsub", "model=tiny_llama", "task.limit=2"]


def fusionlab_multirun(args: list[str], sweep_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "fusionlab.run", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def failing_sweep(tmp_path_factory):
    """2 × 2 sweep on the tiny model where the two ``task.path=/nonexistent`` jobs fail."""
    sweep = tmp_path_factory.mktemp("sweeps") / "sweep_with_failures"
    proc = fusionlab_multirun([*TINY, "generation.max_new_tokens=2,3", "task.path=/nonexistent,null"], sweep)
    return sweep, proc
