"""Token ids and the loss mask of a conversation, rendered with the target's own chat template.

The loss mask covers the assistant turns' tokens (their end-of-turn token included, except for an answer that
regenerate cut at its token limit: the target never ended it) and nothing else. It is
found without any template cooperation (no ``{% generation %}`` block, which a stock chat template
lacks): an assistant turn's text is what rendering the conversation up to that turn adds after rendering the
turns before it with the generation prompt. Character spans then map to tokens through the offsets of a fast
tokenizer. This works for any chat template whose renderings are prefixes of each other.

Memory is bounded before anything is tokenised: a conversation is cut to ``CHARS_PER_TOKEN`` characters of text
per token of ``max_length`` (later turns dropped, the text that crosses the budget cut), so a 10 MB conversation
costs what one of that budget costs, not gigabytes of token offsets. Real text packs far fewer characters into a
token, so the cut lies well past the tokens kept and changes none of them; a cut prompt must still reach
``CUT_MARGIN`` tokens past ``max_length`` (else its text is denser than that and it is rejected), which keeps the
cut's effect on the last tokens before it out of the ones kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.inputs.conversation import BadSample, Message

CHARS_PER_TOKEN = 64  # text kept per token of max_length; real text averages under 8
CUT_MARGIN = 64  # tokens a cut prompt must reach past max_length


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [T] int64, audio placeholder expanded to one id per audio frame
    loss_mask: torch.Tensor  # [T] bool, True on assistant tokens


def build_prompt(
    tokenizer,
    chat_template: str,
    messages: list[Message],
    audio_token: str,
    num_audio_tokens: int,
    max_length: int,
) -> Prompt:
    """Render, tokenize, mask and expand one conversation holding one audio clip."""
    messages, cut = _cut_text(messages, max_length)
    text = render_chat(tokenizer, chat_template, messages)
    spans = _assistant_spans(tokenizer, chat_template, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = torch.tensor([start for start, _ in enc["offset_mapping"]], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    audio_id = tokenizer.convert_tokens_to_ids(audio_token)
    ids, mask = _expand_audio(ids, mask, audio_id, num_audio_tokens)
    if len(ids) > max_length and (ids[max_length:] == ids[0].new_tensor(audio_id)).any():
        raise BadSample(f"over the length limit: the audio ends past --max-length {max_length}")
    if cut and len(ids) < max_length + CUT_MARGIN:
        raise BadSample(
            f"over the length limit: over {max_length * CHARS_PER_TOKEN} characters of text, too dense to cut "
            f"safely to --max-length {max_length} (more than {CHARS_PER_TOKEN} characters a token)"
        )
    return _truncate(Prompt(ids, mask), max_length, cut)


def render_chat(tokenizer, chat_template: str, messages: list[Message], generation_prompt: bool = False) -> str:
    # Templates of audio LLMs recognise an audio item by an "audio" key; the clip itself travels separately.
    items = [
        {**m, "content": [dict(it, audio="<clip>") if it["type"] == "audio" else it for it in m["content"]]}
        for m in messages
    ]
    return tokenizer.apply_chat_template(
        items, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _cut_text(messages: list[Message], max_length: int) -> tuple[list[Message], bool]:
    """The conversation within ``CHARS_PER_TOKEN * max_length`` characters of text, and whether anything was cut.
    Each turn also spends ``CHARS_PER_TOKEN`` on its header (at least one token), so many short turns are cut too."""
    kept: list[Message] = []
    left = max_length * CHARS_PER_TOKEN
    for message in messages:
        left -= CHARS_PER_TOKEN
        if left < 0:
            break
        items, left = _cut_items(message["content"], left)
        kept.append({**message, "content": items})
        if left < 0:
            break
    else:  # all of it fits
        return kept, False
    if any(item["type"] == "audio" for m in messages[len(kept) :] for item in m["content"]):
        raise BadSample(
            f"over the length limit: the audio comes after over {max_length * CHARS_PER_TOKEN} characters of text, "
            f"past --max-length {max_length}"
        )
    return kept, True


def _cut_items(items: list[dict], budget: int) -> tuple[list[dict], int]:
    """A turn's items within ``budget`` characters of text (audio items kept), and the budget left (negative: cut)."""
    out = []
    for item in items:
        if item["type"] == "text" and len(item["text"]) > budget:
            out.append({**item, "text": item["text"][: max(budget, 0)]})
            budget = -1
        else:
            budget -= len(item["text"]) if item["type"] == "text" else 0
            out.append(item)
    return out, budget


def _assistant_spans(tokenizer, chat_template: str, messages: list[Message], text: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, chat_template, messages[:i], generation_prompt=True)
        through = render_chat(tokenizer, chat_template, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise BadSample(f"chat template does not render turn {i} as a prefix of the conversation")
        end = len(through.rstrip())  # the end-of-turn token belongs to the turn; the newline after it does not
        answer = "".join(item["text"] for item in message["content"] if item["type"] == "text")
        if message.get("unfinished") and through.startswith(before + answer):
            end = len(before) + len(answer)  # cut by the generation limit: the end-of-turn is not the target's
        spans.append((len(before), end))
    return spans


def _expand_audio(
    ids: torch.Tensor, mask: torch.Tensor, audio_id: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    where = (ids == audio_id).nonzero().flatten()
    if len(where) != 1:
        raise BadSample(f"rendered prompt holds {len(where)} audio placeholders; expected exactly 1")
    at = int(where[0])
    audio_ids = torch.full((count,), audio_id, dtype=ids.dtype)
    audio_mask = torch.zeros(count, dtype=torch.bool)
    return torch.cat([ids[:at], audio_ids, ids[at + 1 :]]), torch.cat([mask[:at], audio_mask, mask[at + 1 :]])


def _truncate(prompt: Prompt, max_length: int, cut: bool = False) -> Prompt:
    if len(prompt.input_ids) <= max_length:
        return prompt
    ids, mask = prompt.input_ids[:max_length], prompt.loss_mask[:max_length]
    if not mask.any():
        tokens = f"over {len(prompt.input_ids)}" if cut else len(prompt.input_ids)
        raise BadSample(
            f"over the length limit: {tokens} tokens and no assistant token within --max-length {max_length}"
        )
    return Prompt(ids, mask)
