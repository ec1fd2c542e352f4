"""kill -9 (by PID) in the middle of real writes: no half-written final output is ever visible, the next run
cleans the dead process's temp files and produces exactly what an uninterrupted run produces.

Every atomic write pauses at ``write:<target>`` when ``FUSIONLAB_TEST_PAUSE`` names it (a real sleep in the
real code path, its data complete and not yet renamed), so the kill lands at a known point."""
from __future__ import annotations

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
