"""Every ``python -m fusionlab.run`` command written in the README, docs/ and the conf/ comments composes.

Docs drift: the README once showed ``'+ensemble.aux.internlm={source: hf, ...}'``, which OmegaConf refuses (a dict
for a typed ModelSpec). Each command is composed in-process as the CLI would (a sweep's first value stands for the
sweep); paths that exist only on a user's machine are fine here, as composing never opens them.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf.errors import OmegaConfBaseException

from fusionlab.schema import config_error_message
from tests.conftest import REPO, compose_config

SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "conf").rglob("*.yaml"))]
COMMAND = "python -m fusionlab.run"
FLAGS_WITH_VALUES = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--cfg", "-c", "--package",
                     "-p", "--info"}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each command: continuation lines joined, a YAML comment's '#' stripped, the trailing
    '# comment' dropped."""
    found = []
    for path in SOURCES:
        lines = path.read_text(encoding="utf-8").splitlines()
        is_yaml = path.suffix == ".yaml"
        i = 0
        while i < len(lines):
            line = lines[i].lstrip("# ").rstrip() if is_yaml else lines[i].rstrip()
            start = i
            if COMMAND in line and not line.lstrip().startswith(("`", ">")) and "`" not in line.split(COMMAND)[0]:
                command = line[line.index(COMMAND):]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + (lines[i].lstrip("# ").strip() if is_yaml else lines[i].strip())
                found.append((f"{path.relative_to(REPO)}:{start + 1}", command))
            i += 1
    return found


def without_comment(command: str) -> str:
    return re.split(r"\s+#\s", command)[0].strip()


def composable(command: str) -> bool:
    """Not a template: no placeholders (<name>, ...), shell pipes or substitutions, inline-code quotes."""
    text = without_comment(command)
    first = text[len(COMMAND):].split()[:1]
    if first and not re.match(r"[-+~\w./@]+=|-", first[0]):  # prose naming the module (a file table), not a command
        return False
    return not any(c in text for c in ("<", "|", "`", "$(", "...", "…"))


def overrides_of(command: str) -> list[str]:
    """The overrides to compose: flags dropped, each sweep at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = shlex.split(without_comment(command))[len(shlex.split(COMMAND)):]
    overrides, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in FLAGS_WITH_VALUES:
            skip = True
        elif not w.startswith("-"):
            overrides.append(w)
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


CASES = [(where, c) for where, c in documented_commands() if composable(c)]


def test_the_docs_hold_commands():
    assert len(CASES) > 100, "the extraction found too few commands: has the docs' format changed?"


@pytest.mark.parametrize("where,command", CASES, ids=[w for w, _ in CASES])
def test_documented_command_composes(tmp_path, where, command):
    try:
        compose_config(overrides_of(command), tmp_path / "run")
    except (OmegaConfBaseException, Exception) as err:  # Hydra's own errors are not all OmegaConf's
        pytest.fail(f"{where}: {command}\n  → {config_error_message(err)}")
