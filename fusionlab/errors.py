"""User-facing errors.

A :class:`FusionlabError` is a mistake the user can fix (a bad path, an unknown option,
mismatched vocabularies). The CLI prints its message as one paragraph and exits with
status 2 instead of showing a traceback. Messages name the bad value and the fix.

:func:`user_error` is the net under the readers' own checks (:mod:`fusionlab.io`): a format
error a third-party reader raises deep inside a job (safetensors, JSON, YAML, pickles, the HF
hub without network) becomes the same one paragraph instead of a traceback.
"""
from __future__ import annotations

from types import FrameType
from typing import Iterator


class FusionlabError(Exception):
    """An error caused by user input; its message says what was wrong and what to do."""


# (exception class name, module prefix) -> what it means and what to do
_KNOWN: dict[tuple[str, str], str] = {
    ("SafetensorError", "safetensors"): "a safetensors file is truncated or corrupt; re-download or re-save it",
    ("HeaderTooLarge", "safetensors"): "a safetensors file is truncated or corrupt; re-download or re-save it",
    ("JSONDecodeError", "json"): "a JSON file is not valid JSON; fix or replace it",
    ("YAMLError", "yaml"): "a YAML file is not valid YAML; fix it",
    ("ScannerError", "yaml"): "a YAML file is not valid YAML; fix it",
    ("ParserError", "yaml"): "a YAML file is not valid YAML; fix it",
    ("UnpicklingError", "_pickle"): "a checkpoint holds pickled Python objects or is corrupt; fusionlab loads only "
                                    "plain tensors (weights_only=True): re-save it with tensors only, or as safetensors",
    ("UnpicklingError", "pickle"): "a checkpoint holds pickled Python objects or is corrupt; fusionlab loads only "
                                   "plain tensors (weights_only=True): re-save it with tensors only, or as safetensors",
    ("OfflineModeIsEnabled", "huggingface_hub"): "the model is not on this machine and the HF hub is off "
                                                 "(offline); download it first or give a local directory",
    ("LocalEntryNotFoundError", "huggingface_hub"): "the model is not on this machine and the HF hub cannot be "
                                                    "reached; download it first or give a local directory",
    ("RepositoryNotFoundError", "huggingface_hub"): "no such model on the HF hub; check the hub id or give a "
                                                    "local directory",
    ("HFValidationError", "huggingface_hub"): "not a valid hub id nor an existing local path; check the path",
    ("UnicodeDecodeError", "builtins"): "a text file is not UTF-8 text; is it the right file?",
}
_HUB_HINTS = ("couldn't connect to", "cannot connect to", "connection error", "offline mode",
              "is not a local folder and is not a valid model identifier", "does not appear to have a file named")


def user_error(err: BaseException) -> FusionlabError | None:
    """The one-paragraph FusionlabError for a known reader / format / hub error (or a cause of it), else None."""
    seen: BaseException | None = err
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, FusionlabError):
            return seen
        for klass in type(seen).__mro__:
            module = klass.__module__.split(".")[0]
            hint = _KNOWN.get((klass.__name__, module))
            if hint:
                return FusionlabError(f"{hint} ({type(seen).__name__}: {_first_line(seen)}).")
        if isinstance(seen, OSError) and any(h in str(seen).lower() for h in _HUB_HINTS):
            return FusionlabError(f"a model could not be found locally nor fetched from the HF hub "
                                  f"({_first_line(seen)}); check model.path, or download the model and give "
                                  "its local directory.")
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def traceback_frames(err: BaseException) -> Iterator[FrameType]:
    """The frames ``err`` passed through, outermost first (to tell where a third-party error came from)."""
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next
