"""Every reader of a user's file, fed truncated, empty and garbage files: a FusionlabError naming the file (and
line) and the fix — never a traceback from a third-party parser, never an allocation of a claimed size."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fusionlab.errors import FusionlabError, user_error
from fusionlab.io import (check_gguf, read_json, read_jsonl, read_safetensors_header, read_yaml,
                          torch_load)


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path))
    return path


def test_safetensors_header_reads_back(safetensors_file):
    header, start = read_safetensors_header(safetensors_file)
    assert header["w"]["shape"] == [8, 8] and start + 64 * 4 == safetensors_file.stat().st_size


@pytest.mark.parametrize("damage", ["empty", "short", "truncated", "garbage_length", "garbage_json", "not_object"])
def test_safetensors_damage_is_named(safetensors_file, damage):
    data = safetensors_file.read_bytes()
    broken = {"empty": b"", "short": data[:5], "truncated": data[:-10],
              "garbage_length": struct.pack("<Q", 2**62) + data[8:],  # MemoryError in a naive reader
              "garbage_json": data[:8] + b"{" * (len(data) - 8),
              "not_object": struct.pack("<Q", 4) + b"[1] "}[damage]
    safetensors_file.write_bytes(broken)
    with pytest.raises(FusionlabError, match="model.safetensors") as err:
        read_safetensors_header(safetensors_file)
    assert "re-download or re-save" in str(err.value)


def test_merge_reader_uses_the_guarded_header(safetensors_file):
    from fusionlab.merge.io import read_header

    safetensors_file.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(FusionlabError, match="header claims"):
        read_header(safetensors_file)


@pytest.mark.parametrize("name,content,needle", [
    ("config.json", "{garbage", "model config '.*config.json' is not valid JSON"),
    ("config.json", "[1]", "model config '.*config.json' holds a list, not a JSON object"),
    ("model.safetensors.index.json", '{"weight_map": 3}', "checkpoint index '.*index.json' has no weight_map"),
    ("model.safetensors.index.json", "[1]", "checkpoint index '.*index.json' holds a list"),
])
def test_merge_reader_names_a_damaged_config_or_index(tmp_path, safetensors_file, name, content, needle):
    from fusionlab.merge.io import CheckpointReader

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / name).write_text(content)
    with pytest.raises(FusionlabError, match=needle):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("content,needle", [
    ('{"question": "1+1", "answer": "2"}\n{"question": oops}\n', "line 2, is not valid JSON"),
    ('{"question": "1+1", "answer": "2"}\n\n[1, 2]\n', "line 3, holds a list"),
    ('"just a string"\n', "line 1, holds a str"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FusionlabError, match=needle) as err:
        read_jsonl(path)
    assert str(path) in str(err.value)


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


def test_task_loader_reports_the_bad_line(tmp_path):
    from fusionlab.tasks import load_examples

    path = tmp_path / "addsub.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": 4,}\n')
    with pytest.raises(FusionlabError, match=r"addsub.jsonl', line 2"):
        load_examples("addsub", path=str(path))


@pytest.mark.parametrize("task,row,needle", [
    ("addsub", {"question": "x", "answer": "abc"}, "scored against a number, but its answer is 'abc'"),
    ("addsub", {"question": "x", "answer": "nan"}, "scored against a number"),
    ("addsub", {"question": ["x"], "answer": 1}, "'question' must be text"),
    ("addsub", {"question": "x", "answer": True}, "answer=True"),
    ("commonsenseqa", {"question": "x", "answer": {"a": 1}}, "a list of them"),
    ("e2e", {"question": "x", "answer": []}, "a list of them"),
    ("addsub", {"question": "x", "answer": None}, r"has a null \['answer'\]"),
    ("addsub", {"question": "x"}, r"has no \['answer'\] field"),
])
def test_task_fields_of_the_wrong_kind_are_refused_when_the_data_loads(tmp_path, task, row, needle):
    """Before decoding: a gold answer that the task's scorer cannot compare with fails here, not after generation."""
    from fusionlab.tasks import load_examples

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(FusionlabError, match=needle) as err:
        load_examples(task, path=str(path))
    assert f"Example 1 of task {task!r} ({path})" in str(err.value)


def test_numeric_gold_answers_as_text_still_load(tmp_path):
    from fusionlab.tasks import load_examples

    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "half?", "answer": 0.5}\n')
    assert [e["answer"] for e in load_examples("addsub", path=str(path))] == ["2", 0.5]


@pytest.mark.parametrize("reader,content,needle", [
    (read_json, "{not json", "not valid JSON"),
    (read_json, b"\xff\xfe", "not valid JSON"),
    (read_yaml, "a: [1, 2\nb: c", "not valid YAML"),
    (read_yaml, "key: value\n  bad indent: x\n", "line 2"),
])
def test_json_yaml_errors_name_the_file(tmp_path, reader, content, needle):
    path = tmp_path / "file.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FusionlabError, match=needle) as err:
        reader(path)
    assert str(path) in str(err.value)


def test_torch_load_refuses_pickles_shortly(tmp_path):
    import collections

    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, ok)
    assert torch.equal(torch_load(ok)["w"], torch.ones(2))
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"obj": collections.Counter("abc"), "fn": json.dumps}, pickled)
    with pytest.raises(FusionlabError, match="pickled Python objects") as err:
        torch_load(pickled)
    assert len(str(err.value)) < 400 and "pickled.ckpt" in str(err.value)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ok.read_bytes()[:40])
    with pytest.raises(FusionlabError, match="truncated or corrupt|not a torch checkpoint"):
        torch_load(truncated)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.value", 7)
    w.add_tensor("w", np.arange(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("damage", ["empty", "magic", "truncated_header", "truncated_tensors", "garbage"])
def test_gguf_damage_is_named(tmp_path, gguf_file, damage):
    check_gguf(gguf_file)  # the intact file parses
    data = gguf_file.read_bytes()
    broken = {"empty": b"", "magic": b"XXXX" + data[4:], "truncated_header": data[:30],
              "truncated_tensors": data[:-200], "garbage": b"GGUF" + bytes(range(256)) * 4}[damage]
    path = tmp_path / "broken.gguf"
    path.write_bytes(broken)
    with pytest.raises(FusionlabError, match="broken.gguf") as err:
        check_gguf(path)
    assert "re-download" in str(err.value)


def test_model_dir_checks(tmp_path, safetensors_file):
    from fusionlab.models.loading import check_model_dir

    with pytest.raises(FusionlabError, match="not a model directory: it has no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(FusionlabError, match="config.json' is not valid JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    check_model_dir(tmp_path)  # a header-valid shard passes
    safetensors_file.write_bytes(safetensors_file.read_bytes()[:-8])
    with pytest.raises(FusionlabError, match="truncated"):
        check_model_dir(tmp_path)


def test_third_party_errors_become_one_paragraph():
    """The net under the readers: errors a library raises deep inside a job become a FusionlabError."""
    from safetensors import SafetensorError

    assert "safetensors file is truncated" in str(user_error(SafetensorError("incomplete metadata")))
    try:
        json.loads("{")
    except ValueError as e:
        assert "not valid JSON" in str(user_error(e))
    hub = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them")
    assert "HF hub" in str(user_error(hub))
    assert user_error(RuntimeError("a real bug")) is None


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    """Editors such as Notepad start UTF-8 files with a BOM; json refuses it ("Unexpected UTF-8 BOM"), we read it."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"question": "1+1?", "answer": 2}\n')
    (tmp_path / "a.json").write_bytes(bom + b'{"a": 1}')
    (tmp_path / "a.yaml").write_bytes(bom + b"a: 1\n")
    assert read_jsonl(tmp_path / "a.jsonl") == [{"question": "1+1?", "answer": 2}]
    assert read_json(tmp_path / "a.json") == {"a": 1} and read_yaml(tmp_path / "a.yaml") == {"a": 1}


@pytest.mark.parametrize("case,needle", [("utf16", "is not UTF-8 text"), ("dir", "is a directory"),
                                         ("missing", "does not exist")])
def test_an_unreadable_conversation_file_is_named(tmp_path, case, needle):
    """The config-time read of a conversation file (distill.data checks): UTF-16 was a UnicodeDecodeError traceback,
    a directory 'did not exist'."""
    from fusionlab.distill.conversations import load_conversations

    path = tmp_path / "c.jsonl"
    if case == "utf16":
        path.write_text('{"messages": []}\n', encoding="utf-16")
    elif case == "dir":
        path.mkdir()
    with pytest.raises(FusionlabError, match=needle) as err:
        load_conversations(path)
    assert "c.jsonl" in str(err.value)


@pytest.mark.parametrize("content,needle", [('{"text": "a"}\n{bad\n', "line 2, is not valid JSON"),
                                            ("[1, 2]\n", "line 1, holds a list"),
                                            ('{"body": "a"}\n', "has no field 'text'")])
def test_a_text_set_file_names_its_bad_row(tmp_path, content, needle):
    """metric.texts / merge eval sets given as a JSONL file go through the JSONL reader (was json.loads: a traceback)."""
    from fusionlab.tasks.texts import load_text_set

    path = tmp_path / "texts.jsonl"
    path.write_text(content)
    with pytest.raises(FusionlabError, match=needle) as err:
        load_text_set(str(path))
    assert "texts.jsonl" in str(err.value)


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_devices_fusionlab_does_not_run_on_are_refused_at_config_time(device):
    from fusionlab.models import ModelSpec

    with pytest.raises(FusionlabError, match=f"model.device='{device}': fusionlab runs models on the CPU or a CUDA GPU"):
        ModelSpec(name="m", source="embedded", path="smollm2_135m", device=device)


def test_a_cuda_index_past_the_visible_gpus_is_named(monkeypatch):
    """cuda:7 on a one-GPU box: named with the GPUs there are (torch's own error comes later, mid-load)."""
    from fusionlab.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FusionlabError, match=r"model.device='cuda:7' but only 1 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:7", "model.device")
    assert resolve_device("cuda:0", "model.device") == torch.device("cuda:0")
