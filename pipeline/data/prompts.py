"""Prompt templates per benchmark kind (lossaverse.pipeline.data.kinds), and chat-template rendering for instruction models.

Each template tells the model how to state its final answer, in the form the marker reads first
("The answer is X"). Templates are `str.format` strings over the item columns.
"""

from __future__ import annotations

from lossaverse.pipeline.data.kinds import kind_of

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters: a choice item has at most 26 options


def template_for(kind: str, override: str | None = None) -> str:
    if override:
        return override
    return kind_of(kind).template


def render(item: dict, template: str) -> str:
    """The raw prompt text for one item row."""
    choices = item.get("choices") or []
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} options, more than the {len(LETTERS)} option letters A-Z; such items are quarantined at load")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    try:
        return template.format(question=item["question"], options=options, kind=item.get("kind", ""))
    except KeyError as exc:
        raise ValueError(f"prompt template uses unknown field {exc}; available: question, options, kind") from None


def render_chat(prompt: str, tokenizer) -> str:
    """Wrap a raw prompt as a single user turn with the model's chat template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
