"""What adapters over a transformers model share: generation prompts with the clip's audio tokens, batched generation
(end tokens, generation configs, seeded sampling) and the KV-cache steps of speculative decoding.

Nothing here knows a model family: an adapter hands over its HF model, the prompts' ids and the tensors its
model takes (audio features), and gets back each prompt's new tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from pipeline.inputs.conversation import BadSample, Message
from pipeline.inputs.prompt import render_chat
from pipeline.targets.base import DraftDefaults, Sampling, TargetInputs, TargetStates


def generation_prompt(
    tokenizer,
    chat_template: str,
    messages: list[Message],
    audio_token_id: int,
    audio_inputs: Callable[[], tuple[dict[str, torch.Tensor], int]],
    max_length: int,
) -> TargetInputs:
    """The prompt that asks for the next assistant turn, its one audio placeholder expanded to the clip's audio
    tokens; ``audio_inputs()`` gives (the encoder's inputs, the clip's audio token count) when the prompt holds it."""
    text = render_chat(tokenizer, chat_template, messages, generation_prompt=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    where = (ids == audio_token_id).nonzero().flatten()
    if len(where) > 1:
        raise BadSample(f"rendered prompt holds {len(where)} audio placeholders; expected at most 1")
    model_inputs = {}
    if len(where) == 1:  # else the clip comes in a later user turn: this prompt is text only
        model_inputs, count = audio_inputs()
        at = int(where[0])
        audio = torch.full((count,), audio_token_id, dtype=ids.dtype)
        ids = torch.cat([ids[:at], audio, ids[at + 1 :]])
    if len(ids) >= max_length:
        raise BadSample(
            f"over the length limit: the prompt has {len(ids)} tokens, no room for an answer within "
            f"--max-length {max_length}"
        )
    return TargetInputs(ids, torch.zeros(len(ids), dtype=torch.bool), model_inputs)


@torch.no_grad()
def hidden_states_of(
    inner_model: PreTrainedModel, inputs: TargetInputs, layers: list[int], audio_token_id: int, device
) -> TargetStates:
    """One sample through an HF multimodal model's inner model (no lm_head: logits over the full vocabulary are not
    cached, only their input): the requested layers' outputs, the final normed state and the merged input
    embeddings at audio positions, on the CPU."""
    ids = inputs.input_ids[None].to(device)
    out = inner_model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **{k: v.to(device) for k, v in inputs.model_inputs.items()},
        output_hidden_states=True,
        use_cache=False,
    )
    states = out.hidden_states  # [0] merged input embeddings, [i] output of decoder layer i
    audio_positions = (ids[0] == audio_token_id).to(states[0].device)
    return TargetStates(
        hidden_states={i: states[i][0].cpu() for i in layers},
        final_hidden=out.last_hidden_state[0].cpu(),  # after the final norm: the lm_head input
        audio_embeds=states[0][0, audio_positions].cpu(),
    )


def draft_defaults_of(text) -> DraftDefaults:
    """One decoder layer of an HF text config as a dense Llama layer config (the draft's defaults): width, heads,
    head size, norm epsilon, RoPE base, positions and vocabulary, whichever way the config spells them."""
    rope = getattr(text, "rope_parameters", None) or {}
    return DraftDefaults(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        rms_norm_eps=float(text.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        max_position_embeddings=text.max_position_embeddings,
        vocab_size=text.vocab_size,
    )


class HFDecoding:
    """The parts of ``AudioTarget`` that are the same for every HF causal LM (``self.tokenizer``, ``self.model``,
    ``self.device``): decoding ids to text, cropping a ``DynamicCache``, token embeddings. Listed before
    ``AudioTarget`` among an adapter's bases."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def crop_cache(self, cache: DynamicCache, length: int) -> None:
        cache.crop(length - cache.get_seq_length())  # transformers 5: a negative count removes that many tokens

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))


def end_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """The ids that end generation: the generation config's (Instruct models: end of turn and end of text), else
    the text config's, else the tokenizer's."""
    sources = (model.generation_config, model.config.get_text_config(), tokenizer)
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    return []


def pad_token_id(model: PreTrainedModel, tokenizer, eos: list[int]) -> int:
    """The id left padding uses: the generation config's, else the tokenizer's, else the first end token."""
    for pad in (model.generation_config.pad_token_id, tokenizer.pad_token_id, *eos[:1]):
        if pad is not None:
            return int(pad)
    raise ValueError("the model has no pad, end-of-text or end-of-turn token to pad batches with")


class SeededSampler(LogitsProcessor):
    """Sampling as greedy search over Gumbel-perturbed scores, one noise generator per row.

    ``argmax(log p + Gumbel noise)`` is a draw from ``p`` (the Gumbel-max trick), so greedy search over the
    warped scores plus noise draws from the same distribution as ``do_sample=True`` with the same temperature,
    top-k and top-p (other warpers, e.g. min_p, are not applied). HF's sampler draws every row from one global
    generator, so a row's answer would depend on its batch; here row r's t-th token always uses the t-th draw of
    its own generator, whatever else is in the batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int | None, top_p: float, device):
        self.warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:  # as HF sampling does: a checkpoint's generation config may set one
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        size, device = scores.shape[-1], scores.device
        # Exp(1) noise e gives Gumbel noise -log(e).
        noise = torch.stack([torch.empty(size, device=device).exponential_(generator=g) for g in self.generators])
        return scores - noise.log()


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, W], attention mask [B, W]): left padding puts every row's next token in the same column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def cut_after_end(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first end token (generate pads finished rows after it)."""
    ends = set(eos)
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in ends), tokens)


@contextmanager
def _generation_config_as_default(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    # ``generate`` fills every option left unset from the model's own generation config: swapping it is the only
    # way to keep a checkpoint's penalties (repetition_penalty, no_repeat_ngram_size, ...) out of plain decoding.
    saved, model.generation_config = model.generation_config, config
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    model_inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: Sequence[int],
    pad_id: int,
    sampling: Sampling | None = None,
    checkpoint_settings: bool = True,
) -> list[list[int]]:
    """Each prompt's new tokens, cut after its first end token; see ``AudioTarget.generate``."""
    eos = list(eos)
    if checkpoint_settings:
        # The checkpoint's own settings (penalties, ...) with our decoding on top. Sampling runs as greedy search
        # over noised scores (SeededSampler), so HF's own warpers stay off.
        config = copy.deepcopy(model.generation_config)
        config.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        top_k = model.generation_config.top_k
    else:
        config, top_k = GenerationConfig(), None
    config.update(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=eos or None, pad_token_id=pad_id)
    device = model.device
    processors = LogitsProcessorList()
    if sampling is not None:
        if len(sampling.seeds) != len(prompts):
            raise ValueError(f"{len(sampling.seeds)} seeds for {len(prompts)} prompts")
        processors.append(SeededSampler(sampling.seeds, sampling.temperature, top_k, sampling.top_p, device))
    ids, mask = left_pad(prompts, pad_id)
    with nullcontext() if checkpoint_settings else _generation_config_as_default(model, config):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            **{name: value.to(device) for name, value in model_inputs.items()},
            generation_config=config,
            logits_processor=processors,
        )
    return [cut_after_end(row.tolist(), eos) for row in out[:, ids.shape[1] :].cpu()]
