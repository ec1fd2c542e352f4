"""User-facing errors.

A :class:`FusionlabError` is a mistake the user can fix (a bad path, an unknown option,
mismatched vocabularies). The CLI prints its message as one paragraph and exits with
status 2 instead of showing a traceback. Messages name the bad value and the fix.
"""


class FusionlabError(Exception):
    """An error caused by user input; its message says what was wrong and what to do."""
