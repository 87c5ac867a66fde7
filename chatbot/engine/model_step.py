"""One decoder step for every running row, whatever position each row has reached.

``generate`` advances a batch whose rows all sit at the same position. The decode loop
mixes rows that joined at different steps, so each row brings its own position and
attends only to its own filled keys: both steps attend reply by reply, each in the call
``generate`` makes for that reply alone (SDPA's result for a row depends on the width
and the batch it is computed in, so one masked call would not be exact).

* ``EncoderDecoderStep`` (Blenderbot): admitting a reply runs the encoder and projects
  the cross-attention keys/values once into the reply's rows (beams share them); each
  step then runs the decoder layers by hand, from the model's own modules, because
  transformers' Blenderbot decoder takes one position for the whole batch.
* ``DecoderOnlyStep`` (Llama, SmolLM2, Qwen...): admitting a reply runs its prompt
  through the model as ``generate`` would and copies the keys/values into its rows;
  each step is the model's own forward with per-row ``position_ids``, a cache that
  writes into the rows, and an attention function registered with transformers
  (``PER_REPLY``) that attends reply by reply too. Any transformers causal LM whose
  attention goes through transformers' attention interface works unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatbot.engine.slots import RowSlots


class ModelStep(ABC):
    """The model's part of the loop: admit prompts into rows, advance rows one token."""

    slots: RowSlots

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device

    @abstractmethod
    def admit(self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]):
        """Load each prompt into rows ``firsts[i] .. firsts[i] + copies[i] - 1``.

        Returns (sum(copies), vocab) logits of each reply's first token when the prompt
        pass yields them (decoder-only), else None (the first decode step will)."""

    @abstractmethod
    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        """Feed ``tokens[i]`` at ``positions[i]`` to rows 0..n-1, which belong to
        replies of ``replies`` rows each, in order; (n, vocab) logits."""

    def reserve(self, rows: int) -> None:
        self.slots.reserve(rows)

    def release(self) -> None:
        """Give the key/value buffers back while no reply runs."""
        self.slots.release()

    def move(self, source: list[int], target: list[int]) -> None:
        """Rows ``source`` move into rows ``target`` (the scheduler's compaction)."""
        device = self.device
        self._move_rows(torch.tensor(source, device=device), torch.tensor(target, device=device))

    def _move_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.slots.move(source, target)

    def reorder(self, first: int, parents: torch.Tensor) -> None:
        self.slots.reorder(first, parents)

    def _make_room(self, positions: torch.Tensor, replies: Sequence[int]) -> tuple[int, list[_Run]]:
        """Room in the key/value buffers for every row's new position: the widest
        row's length, and each reply's run (``attend_by_run``)."""
        lengths = (positions + 1).tolist()
        width = max(lengths)
        self.slots.reserve(len(lengths), width)
        return width, _runs(lengths, replies)


@dataclass(frozen=True)
class _Run:
    """One reply's rows (its beams), which attend over the same number of positions."""

    rows: slice
    length: int


def _runs(lengths: list[int], replies: Sequence[int]) -> list[_Run]:
    """Each reply's block of rows, with its length (``lengths`` has one per row)."""
    runs, first = [], 0
    for count in replies:
        runs.append(_Run(slice(first, first + count), lengths[first]))
        first += count
    return runs


def attend_by_run(
    runs: Sequence[_Run],
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``attend(query, keys, values)`` once per reply, on its rows and over its own
    length, the results in row order. One call for the whole batch (the widest row's
    length, the rest masked) sums in another order: SDPA's result for a row depends on
    the width and on the batch size (up to 4.8e-7 apart, enough to flip an int8
    activation's rounding), so a reply would depend on the replies beside it. These are
    the calls ``generate`` makes for each reply alone; measured no slower than the
    masked call."""
    if len(runs) == 1 and runs[0].length == keys.shape[2]:  # one reply: all of them
        return attend(query, keys, values)
    return torch.cat([
        attend(query[run.rows], keys[run.rows, :, : run.length], values[run.rows, :, : run.length])
        for run in runs
    ])  # fmt: skip


PER_REPLY = "chatbot_per_reply"
"""The attention implementation a decoder-only model runs under the decode loop."""


def attend_per_reply(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    runs: Sequence[_Run] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, unmasked, once per reply over the reply's own
    length when the decode loop passes ``runs`` (``attend_by_run``), as Blenderbot's
    step attends; transformers' own otherwise (prompts, ``generate``)."""
    if runs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]

    return attend_by_run(runs, query, key, value, unmasked), None


AttentionInterface.register(PER_REPLY, attend_per_reply)
AttentionMaskInterface.register(PER_REPLY, sdpa_mask)


class EncoderDecoderStep(ModelStep):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        config = model.config
        self.decoder = model.get_decoder()
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        layers, positions = config.decoder_layers, config.max_position_embeddings
        shape = (layers, self.heads, positions, self.head_dim, model.dtype, self.device)
        self.slots = RowSlots(*shape)  # self-attention: the reply's own positions
        self.cross = RowSlots(*shape)  # cross-attention: the encoded prompt
        self.prompt_lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    def reserve(self, rows: int) -> None:
        super().reserve(rows)
        self.cross.reserve(rows)
        if rows > self.prompt_lengths.shape[0]:
            grown = self.prompt_lengths.new_zeros(self.cross.capacity)
            grown[: self.prompt_lengths.shape[0]] = self.prompt_lengths
            self.prompt_lengths = grown

    def release(self) -> None:
        super().release()
        self.cross.release()
        self.prompt_lengths = self.prompt_lengths.new_zeros(0)

    def _move_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        super()._move_rows(source, target)
        self.cross.move(source, target)
        self.prompt_lengths[target] = self.prompt_lengths[source]

    def admit(self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]):
        # Each prompt alone, as ``generate`` encodes a reply's prompt: a padded batch
        # would give each its attention over the batch's longest (see ``_attend``).
        encoder = self.model.get_encoder()
        for prompt, first, count in zip(prompts, firsts, copies, strict=True):
            ids = torch.tensor([list(prompt)], device=self.device)
            encoded = encoder(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
            rows = slice(first, first + count)
            for index, layer in enumerate(self.decoder.layers):
                self.cross.fill(index, rows, *self._cross_keys_values(layer, encoded))
            self.prompt_lengths[rows] = len(prompt)
        return None

    def _cross_keys_values(self, layer, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = layer.encoder_attn
        return self._heads(attention.k_proj(encoded)), self._heads(attention.v_proj(encoded))

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """(n, length, d_model) -> (n, heads, length, head_dim)."""
        n, length, _ = states.shape
        return states.view(n, length, self.heads, self.head_dim).transpose(1, 2)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        n = tokens.shape[0]
        decoder = self.decoder
        hidden = decoder.embed_tokens(tokens[:, None])
        hidden = hidden + decoder.embed_positions(hidden.shape, position_ids=positions[:, None])
        width, own_runs = self._make_room(positions, replies)
        prompt_lengths = self.prompt_lengths[:n]
        prompt_width = int(prompt_lengths.max())
        prompt_runs = _runs(prompt_lengths.tolist(), replies)
        at = self.slots.at(positions)
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            states = layer.self_attn_layer_norm(hidden)
            keys, values = (
                self._heads(attention.k_proj(states)),
                self._heads(attention.v_proj(states)),
            )
            self.slots.write(index, at, keys, values)
            keys, values = self.slots.view(index, n, width)
            hidden = hidden + self._attend(attention, states, keys, values, own_runs)
            cross = layer.encoder_attn
            states = layer.encoder_attn_layer_norm(hidden)
            keys, values = self.cross.view(index, n, prompt_width)
            hidden = hidden + self._attend(cross, states, keys, values, prompt_runs)
            states = layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden)))
            hidden = hidden + layer.fc2(states)
        hidden = decoder.layer_norm(hidden)
        logits = self.model.lm_head(hidden) + self.model.final_logits_bias
        return logits[:, 0]

    def _attend(self, attention, states, keys, values, runs: list[_Run]) -> torch.Tensor:
        """Each reply's rows attend in a call of their own (``attend_by_run``)."""
        query = self._heads(attention.q_proj(states))
        scaled = partial(functional.scaled_dot_product_attention, scale=attention.scaling)
        out = attend_by_run(runs, query, keys, values, scaled)
        return attention.out_proj(out.transpose(1, 2).reshape(states.shape))


class _RowsCache(Cache):
    """Shows one step's rows to a transformers model as its ``past_key_values``."""

    def __init__(self, slots: RowSlots, positions: torch.Tensor, width: int) -> None:
        super().__init__(layers=[])
        self.slots, self.at, self.width = slots, slots.at(positions), width

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.slots.write(layer_idx, self.at, key_states, value_states)
        return self.slots.view(layer_idx, key_states.shape[0], self.width)


class DecoderOnlyStep(ModelStep):
    def __init__(self, model: PreTrainedModel, positions: int) -> None:
        super().__init__(model)
        model.set_attn_implementation(PER_REPLY)  # SDPA's, until a step passes runs
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        heads = config.num_key_value_heads or heads  # grouped-query attention caches fewer
        shape = (config.num_hidden_layers, heads, positions, head_dim, model.dtype, self.device)
        self.slots = RowSlots(*shape)

    def admit(self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]):
        first_logits = []
        for prompt, first, count in zip(prompts, firsts, copies, strict=True):
            ids = torch.tensor([list(prompt)], device=self.device)
            cache = DynamicCache(config=self.model.config)
            logits = self.model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
            rows = slice(first, first + count)
            for layer, cached in enumerate(cache.layers):
                keys, values = getattr(cached, "keys", None), getattr(cached, "values", None)
                if keys is None or values is None:
                    raise TypeError(f"cache layer {layer} holds no keys: not an attention model")
                self.slots.fill(layer, rows, keys, values)
            first_logits.append(logits[:, -1].expand(count, -1))
        return torch.cat(first_logits)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        width, runs = self._make_room(positions, replies)
        # Each reply attends over its own length (``runs``): the mask is never read,
        # and a 4-D one spares transformers building its own.
        shape = (tokens.shape[0], 1, 1, width)
        unread_mask = torch.ones(shape, dtype=torch.bool, device=self.device)
        outputs = self.model(
            input_ids=tokens[:, None],
            position_ids=positions[:, None],
            attention_mask=unread_mask,
            past_key_values=_RowsCache(self.slots, positions, width),
            use_cache=True,
            runs=runs,
        )
        return outputs.logits[:, -1]
