"""Output paths: refused before any work when they exist, replaced only when fusionlab wrote them, never through a
symlink; files and dirs carry the user's umask; temp leftovers of dead processes are cleaned, a live one's never."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.io import OUTPUT_MARKER, atomic_dir, check_output_path, clean_stale_temps, write_json


def _write(path, overwrite=False, text="new"):
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "weights.txt").write_text(text)


def test_existing_output_is_refused_before_the_block_runs(tmp_path):
    out = tmp_path / "merged"
    _write(out)
    assert (out / OUTPUT_MARKER).is_file()
    ran = []
    with pytest.raises(FusionlabError, match="already exists; .*overwrite=true"):
        with atomic_dir(out):
            ran.append(1)
    assert not ran, "the existence check comes before any work"
    _write(out, overwrite=True, text="second")  # ours: replaced
    assert (out / "weights.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "no temp dir left beside it"


def test_overwrite_never_replaces_what_fusionlab_did_not_write(tmp_path):
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter1.tex").write_text("precious")
    with pytest.raises(FusionlabError, match="not written by fusionlab"):
        _write(theirs, overwrite=True)
    assert (theirs / "chapter1.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(FusionlabError, match="not written by fusionlab"):
        _write(a_file, overwrite=True)
    assert a_file.read_text() == "keep"


def test_symlinked_output_is_refused_and_its_target_kept(tmp_path):
    target = tmp_path / "elsewhere"
    _write(target, text="target")
    link = tmp_path / "link"
    link.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(FusionlabError, match="is a symlink"):
            _write(link, overwrite=overwrite)
    assert (target / "weights.txt").read_text() == "target" and link.is_symlink()


def test_merge_output_checked_when_the_config_is_built(tmp_path):
    from fusionlab.merge.config import MergeConfig

    existing = tmp_path / "out"
    existing.mkdir()
    with pytest.raises(FusionlabError, match="merge.output .* already exists"):
        MergeConfig(method="linear", models=["a", "b"], output=str(existing))
    with pytest.raises(FusionlabError, match="not written by fusionlab"):
        MergeConfig(method="linear", models=["a", "b"], output=str(existing), overwrite=True)


def test_a_merge_written_over_one_of_its_inputs_is_refused_and_the_input_kept(tmp_path):
    """A previous merge (fusionlab's marker) given as an input and as the output with overwrite=true: the atomic
    rename would have replaced the model the merge reads. Refused at plan time; its files unchanged."""
    from fusionlab.merge import MergeConfig, merge
    from tests.merge.conftest import tiny_state, write_model

    for seed in (0, 1):
        write_model(tmp_path / f"m{seed}", tiny_state(seed))
    first = tmp_path / "merged"
    merge(MergeConfig(method="linear", models=[str(tmp_path / "m0"), str(tmp_path / "m1")],
                      parameters={"weight": 0.5}, output=str(first), progress=False))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    again = MergeConfig(method="linear", models=[str(first), str(tmp_path / "m1")], parameters={"weight": 0.5},
                        output=str(first), overwrite=True, progress=False)
    with pytest.raises(FusionlabError, match=r"merge.output .* is the model .*merged.*, which this job reads"):
        merge(again)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


@pytest.mark.parametrize("output,inputs,needle", [
    ("a", {"model": "a"}, "is the model"),
    ("", {"model": "a/b"}, "holds the model"),  # replacing the parent would delete the input inside it
    ("a/merged", {"model": "a"}, None),  # an output inside a model dir replaces nothing of it
    ("b", {"model": "a"}, None),
])
def test_check_not_an_input(tmp_path, output, inputs, needle):
    from fusionlab.io import check_not_an_input

    labelled = [(label, tmp_path / path) for label, path in inputs.items()]
    if needle is None:
        check_not_an_input(tmp_path / output, labelled)
    else:
        with pytest.raises(FusionlabError, match=needle):
            check_not_an_input(tmp_path / output, labelled)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        _write(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_stale_temps_of_dead_processes_are_cleaned(tmp_path):
    from fusionlab.io import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_dir = tmp_path / f".merged.{_host()}-{dead_pid}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "model-00001.safetensors").write_bytes(b"0" * 1000)
    stale_file = tmp_path / f".metrics.json.{_host()}-{dead_pid}.xyz.tmp"
    stale_file.write_text("{")
    live = tmp_path / f".merged.{_host()}-{os.getpid()}.live.tmp"
    live.mkdir()
    other_host = tmp_path / f".merged.otherhost-{dead_pid}.q.tmp"
    other_host.mkdir()
    unrelated = tmp_path / ".hidden_user_dir"
    unrelated.mkdir()
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_file.name])
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_check_output_path_passes_new_paths(tmp_path):
    assert check_output_path(tmp_path / "new") == tmp_path / "new"
