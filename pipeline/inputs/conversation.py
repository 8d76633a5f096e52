"""A sample's conversation: parse and validate the json member of a shard.

Format (one clip per sample): ``{"conversations": [{"role": "system"|"user"|"assistant", "content": ...}]}``
where content is a string or a list of ``{"type": "audio"}`` / ``{"type": "text", "text": ...}`` items.
The ``{"type": "audio"}`` item marks where the sample's clip goes; a conversation with no such item gets
the clip at the start of its first user turn, the convention of ASR/QA datasets whose user turn is text only.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")


class BadSample(ValueError):
    """A sample that cannot be cached; the message is the reason recorded next to its key."""


Message = dict[str, Any]


def parse_conversations(raw: bytes | None) -> list[Message]:
    """Parse a shard's json member into normalised messages (content always a list of items)."""
    if raw is None:
        raise BadSample("missing json member (expected <key>.json with a 'conversations' list)")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample(f"malformed json: {err}") from None
    turns = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(turns, list) or not turns:
        raise BadSample("json has no non-empty 'conversations' list")
    messages = [_normalise_message(i, turn) for i, turn in enumerate(turns)]
    for i in _unfinished_turns(doc):
        if 0 <= i < len(messages) and messages[i]["role"] == "assistant":
            messages[i]["unfinished"] = True
    _check_order(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("conversation has no assistant turn (nothing to learn from)")
    return _place_audio(messages)


def _unfinished_turns(doc: dict) -> list[int]:
    """Assistant turns that regenerate cut at --max-new-tokens: the target never ended them, so their end-of-turn
    token is not the target's and is left out of the loss mask (``prompt.build_prompt``)."""
    regeneration = doc.get("regeneration")
    cut = regeneration.get("cut_at_max_new_tokens") if isinstance(regeneration, dict) else None
    return [i for i in cut if isinstance(i, int)] if isinstance(cut, list) else []


def _normalise_message(index: int, turn: Any) -> Message:
    if not isinstance(turn, dict) or turn.get("role") not in ROLES:
        raise BadSample(f"turn {index} is not a {{'role': one of {ROLES}, 'content': ...}} object")
    content = turn.get("content")
    if isinstance(content, str):
        return {"role": turn["role"], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise BadSample(f"turn {index} content must be a string or a list of items")
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "audio":
            items.append({"type": "audio"})
        elif kind == "text" and isinstance(item.get("text"), str):
            items.append({"type": "text", "text": item["text"]})
        else:
            raise BadSample(f"turn {index} has an item that is neither audio nor text: {item!r:.80}")
    return {"role": turn["role"], "content": items}


def _check_order(messages: list[Message]) -> None:
    """System turns first, then a user turn before any assistant turn (an answer needs its question; a chat
    template cannot render a conversation that opens with one)."""
    roles = [m["role"] for m in messages]
    began = next((i for i, role in enumerate(roles) if role != "system"), len(roles))
    late_system = next((i for i in range(began, len(roles)) if roles[i] == "system"), None)
    if late_system is not None:
        raise BadSample(f"turn {late_system} is a system turn after the conversation began (system turns come first)")
    if began < len(roles) and roles[began] == "assistant":
        raise BadSample(
            f"turn {began} is an assistant turn before any user turn (turns go: system, then user and assistant)"
        )


def _place_audio(messages: list[Message]) -> list[Message]:
    audio_items = [(m["role"], item) for m in messages for item in m["content"] if item["type"] == "audio"]
    if len(audio_items) > 1:
        raise BadSample(f"conversation refers to {len(audio_items)} audio clips; a sample holds one")
    if audio_items:
        if audio_items[0][0] != "user":
            raise BadSample("the audio item must be in a user turn")
        return messages
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise BadSample("conversation has no user turn to attach the audio to")
    first_user["content"].insert(0, {"type": "audio"})
    return messages


def text_of(messages: list[Message]) -> str:
    """All text of a conversation (for tokenizer corpora and debugging)."""
    return "\n".join(item["text"] for m in messages for item in m["content"] if item["type"] == "text")
