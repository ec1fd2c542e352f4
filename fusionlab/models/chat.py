"""Prompts in each model's own format: its chat template, or plain text for base models."""
from __future__ import annotations

from fusionlab.errors import FusionlabError


def render_prompt(tokenizer, messages: list[dict[str, str]], *, use_chat_template: bool = True,
                  assistant_prefix: str = "") -> str:
    """Render ``messages`` as the text a model continues, ending with ``assistant_prefix``.

    With a chat template the generation prompt is added and the prefix follows it; without
    one (base models) messages become ``Question: ...\\nAnswer: <prefix>``-style plain text.
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise FusionlabError(
                f"Tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; set "
                "model.use_chat_template=false for a base model or give model.chat_template=<jinja>."
            )
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"Question: {m['content']}")
        else:
            parts.append(f"Answer: {m['content']}")
    answer = f"Answer: {assistant_prefix}" if assistant_prefix else "Answer:"
    return "\n".join(parts) + "\n" + answer
