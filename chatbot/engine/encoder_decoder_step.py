"""The decode loop's step for Blenderbot: its decoder layers written out, row by row.

Admitting replies runs the encoder on their prompts (side by side, each as if alone:
``PackedPrompts``) and projects each one's cross-attention keys and values once, into
a cross-attention row of its own that all its beams read
(``Run.shared_row``): a copy per beam was 10x the memory, and about 1.2 GB read at
every step of 16 ten-beam replies of Blenderbot-400M. Each step then runs the
decoder layers by hand, from the model's own modules, because transformers' Blenderbot
decoder takes one position for the whole batch: every row here brings its own position
and attends over its own reply and its own prompt (``attend_by_run``).

A conversation alone is mostly small operations (norms, the int8 activations'
quantization, attention's reshapes, the Python between them: 28% of a 400M int8 step
on a 2-core EPYC), so its layers can be compiled into one C++ function
(``compiled_step``): ``OneRowDecoderLayers`` is what is exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional
from transformers import PreTrainedModel

from chatbot.engine.kernels.rows import padded_by
from chatbot.engine.model_step import (
    OneRowCompilable,
    PackedPrompts,
    Run,
    Runs,
    _runs,
    attend_by_run,
    batch_dims,
    length_carrier,
    padding_carrier,
)
from chatbot.engine.slots import RowSlots


class DecoderRows(NamedTuple):
    """What every decoder layer of one step needs to know of its rows."""

    at: tuple[torch.Tensor, torch.Tensor]
    """Where their keys and values go (``RowSlots.at``)."""
    own: Runs
    """Each reply's rows and length so far (self-attention)."""
    width: int
    """The longest reply's length."""
    prompt: Runs
    """Each reply's rows and prompt length (cross-attention)."""
    prompt_width: int
    """The longest prompt's length."""


class EncoderDecoderStep(OneRowCompilable):
    compiled_name = "encoder-decoder"

    def __init__(self, model: PreTrainedModel, stored: torch.dtype) -> None:
        super().__init__(model, stored)
        config = model.config
        self.decoder = model.get_decoder()
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        layers, positions = config.decoder_layers, config.max_position_embeddings
        shape = (layers, self.heads, positions, self.head_dim, self.stored, self.device)
        self.slots = RowSlots(*shape)  # self-attention: each row's own positions
        self.cross = RowSlots(*shape)  # cross-attention: a row per reply, its prompt
        self.prompts = torch.zeros((0, 2), dtype=torch.long)
        """For each running row: its reply's row of ``cross``, and the prompt's length."""

    def reserve(self, rows: int) -> None:
        super().reserve(rows)
        if rows > self.prompts.shape[0]:
            grown = self.prompts.new_zeros((self.slots.capacity, 2))
            grown[: self.prompts.shape[0]] = self.prompts
            self.prompts = grown

    def release(self) -> None:
        super().release()
        self.cross.release()
        self.prompts = self.prompts.new_zeros((0, 2))

    def _move_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        super()._move_rows(source, target)
        self.prompts[target.cpu()] = self.prompts[source.cpu()]  # their prompts stay put

    def admit(self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]):
        taken = set(self.prompts[: firsts[0], 0].tolist())  # the running replies'
        rows = []
        for prompt, first, count in zip(prompts, firsts, copies, strict=True):
            row = next(row for row in range(len(taken) + 1) if row not in taken)
            taken.add(row)
            rows.append(row)
            self.prompts[first : first + count] = torch.tensor([row, len(prompt)])
        for group in self.prompt_passes(prompts):
            self._encode([prompts[i] for i in group], [rows[i] for i in group])
        return None

    def _encode(self, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> None:
        """Run the encoder on ``prompts`` side by side (``PackedPrompts``), and store
        each one's cross-attention keys and values in its row of ``cross``: a prompt
        gets the values ``generate`` encodes it to alone, and the products run as
        one call for them all (one at a time, 33 ms a prompt of Blenderbot-400M int8
        went mostly in small calls)."""
        encoder = self.model.get_encoder()
        packed = PackedPrompts.of(prompts, self.device)
        embedded = encoder.embed_tokens(packed.ids)
        hidden = embedded + encoder.embed_positions(embedded.shape, position_ids=packed.positions)
        for layer in encoder.layers:
            hidden = layer(hidden, None, spans=packed.spans)
        encoded = encoder.layer_norm(hidden)
        for index, layer in enumerate(self.decoder.layers):
            keys, values = self._cross_keys_values(layer, encoded)
            for row, span in zip(rows, packed.spans, strict=True):
                self.cross.fill(index, slice(row, row + 1), keys[:, :, span], values[:, :, span])

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
        cross_rows, prompt_lengths = self.prompts[:n].T.tolist()
        prompt_width = max(prompt_lengths)
        one_row, batch = self.one_row, self.batch
        compiled = min(width, prompt_width) >= 2  # the packages' widths are 2 or more
        if one_row is not None and n == 1 and compiled:
            cross = self.cross.row_views(cross_rows[0])
            inputs = self._one_row_inputs(hidden, positions, width, prompt_width, self.slots, cross)
            hidden = one_row(*inputs)
        elif batch is not None and self.batch_takes(n) and compiled:
            inputs = self._batch_inputs(
                hidden, positions, self.prompts[:n], width, prompt_width, self.slots, self.cross
            )
            hidden = batch(*inputs)
        else:
            prompt_runs = Runs(
                Run(run.rows, run.length, shared_row=cross_rows[run.rows.start])
                for run in _runs(prompt_lengths, replies)
            )
            rows = DecoderRows(self.slots.at(positions), own_runs, width, prompt_runs, prompt_width)
            hidden = self.layers(hidden, rows, self.slots, self.cross)
        logits = self.model.lm_head(hidden) + self.model.final_logits_bias
        return logits[:, 0]

    def layers(
        self, hidden: torch.Tensor, rows: DecoderRows, slots: RowSlots, cross: RowSlots
    ) -> torch.Tensor:
        """The decoder layers and final norm on (n, 1, d_model) ``hidden``, one new
        position per row, keys and values from (and into) ``slots`` and ``cross``."""
        n = hidden.shape[0]
        decoder = self.decoder
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            states = layer.self_attn_layer_norm(hidden)
            keys, values = (
                self._heads(attention.k_proj(states)),
                self._heads(attention.v_proj(states)),
            )
            slots.write(index, rows.at, keys, values)
            keys, values = slots.view(index, n, rows.width)
            hidden = hidden + self._attend(attention, states, keys, values, rows.own)
            states = layer.encoder_attn_layer_norm(hidden)
            keys, values = cross.view(index, cross.capacity, rows.prompt_width)
            hidden = hidden + self._attend(layer.encoder_attn, states, keys, values, rows.prompt)
            states = self._by_rows(layer.activation_fn, layer.fc1(layer.final_layer_norm(hidden)))
            hidden = hidden + layer.fc2(states)
        return decoder.layer_norm(hidden)

    @staticmethod
    def _by_rows(
        activation: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor
    ) -> torch.Tensor:
        """A layer's ``activation`` of (n, 1, ffn) ``states``, on them as (n, ffn) rows.

        ATen's ``gelu`` runs oneDNN's, whose primitives are cached by shape: a compiled
        step handed it its (n, 1, ffn) input with a stride of 0 for the 1, oneDNN
        computed that layout otherwise (up to 4.8e-7 apart), and whichever of the two
        layouts came first set the values of both, eager steps' included. Rows have one
        layout, and give ``generate``'s values (dense, as its (n, 1, ffn) are)."""
        return activation(states.view(states.shape[0], -1)).view(states.shape)

    def _attend(self, attention, states, keys, values, runs: Runs) -> torch.Tensor:
        """Each reply's rows attend in a call of their own (``attend_by_run``)."""
        query = self._heads(attention.q_proj(states))
        scaled = partial(functional.scaled_dot_product_attention, scale=attention.scaling)
        out = attend_by_run(runs, query, keys, values, scaled, attention.scaling)
        return attention.out_proj(out.transpose(1, 2).reshape(states.shape))

    @staticmethod
    def _one_row_inputs(
        hidden: torch.Tensor,
        position: torch.Tensor,
        width: int,
        prompt_width: int,
        slots: RowSlots,
        cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    ) -> tuple:
        """``cross``: the row's prompt keys and values (``RowSlots.row_views``)."""
        width_of = length_carrier(width, hidden.device)
        prompt_width_of = length_carrier(prompt_width, hidden.device)
        return hidden, position, width_of, prompt_width_of, *slots.row_views(), *cross

    @staticmethod
    def _batch_inputs(
        hidden: torch.Tensor,
        positions: torch.Tensor,
        prompts: torch.Tensor,
        width: int,
        prompt_width: int,
        slots: RowSlots,
        cross: RowSlots,
    ) -> tuple:
        """``prompts``: each row's cross-attention row and prompt length (n, 2)."""
        n, device = hidden.shape[0], hidden.device
        cross_rows, prompt_lengths = prompts.T.contiguous()
        return (
            hidden, positions, positions + 1, cross_rows, prompt_lengths,
            padding_carrier(n, device), length_carrier(width, device),
            length_carrier(prompt_width, device), *slots.buffers(), *cross.buffers(),
        )  # fmt: skip

    def one_row_layers(self) -> nn.Module:
        return OneRowDecoderLayers(self)

    def batch_layers(self) -> nn.Module:
        return BatchDecoderLayers(self)

    def batch_example_inputs(self, rows: int, width: int, capacity: int) -> tuple:
        """Row 0 is the longest, reply and prompt; prompt rows are fewer than rows (as
        a reply's beams share one), each read by any rows."""
        generator = torch.Generator().manual_seed(0)
        prompt_capacity, prompt_rows = min(2 * capacity, self.cross.max_positions), rows // 2 + 1
        slots = self.slots.random_rows(capacity, generator, rows + 1)
        cross = self.cross.random_rows(prompt_capacity, generator, prompt_rows)
        hidden = torch.randn(rows, 1, self.heads * self.head_dim, generator=generator)
        positions = torch.randint(0, width, (rows,), generator=generator)
        prompts = torch.stack(
            [
                torch.randint(0, prompt_rows, (rows,), generator=generator),
                torch.randint(1, capacity, (rows,), generator=generator),
            ],
            dim=1,
        )
        positions[0], prompts[0, 1] = width - 1, capacity - 1
        device = self.device
        return self._batch_inputs(
            hidden.to(device), positions.to(device), prompts, width, capacity - 1, slots, cross
        )

    def batch_dynamic_shapes(self) -> tuple:
        Dim = torch.export.Dim
        most, layers = self.slots.max_positions, len(self.slots.keys)
        per_row, padding = batch_dims()
        width, prompt_width = Dim("width", min=2, max=most), Dim("prompt", min=2, max=most)
        own = [{0: Dim("row_capacity", min=2), 2: Dim("capacity", min=2, max=most)}] * layers
        cross = [
            {0: Dim("prompt_rows", min=1), 2: Dim("prompt_capacity", min=2, max=most)}
        ] * layers
        return (
            per_row, per_row, per_row, per_row, per_row, padding, {0: width},
            {0: prompt_width}, own, own, cross, cross,
        )  # fmt: skip

    def example_inputs(self, width: int, capacity: int) -> tuple:
        """The prompt is ``capacity - 1`` long, in cross-attention buffers twice as
        long as the reply's (capped by the model's positions): the export must not
        take the two for one dimension."""
        generator = torch.Generator().manual_seed(0)
        slots = self.slots.random_rows(capacity, generator)
        cross = self.cross.random_rows(min(2 * capacity, self.cross.max_positions), generator)
        hidden = torch.randn(1, 1, self.heads * self.head_dim, generator=generator)
        position = torch.tensor([width - 1], device=self.device)
        return self._one_row_inputs(
            hidden.to(self.device), position, width, capacity - 1, slots, cross.row_views()
        )

    def dynamic_shapes(self) -> tuple:
        Dim = torch.export.Dim
        most, layers = self.slots.max_positions, len(self.slots.keys)
        width, prompt_width = Dim("width", min=2, max=most), Dim("prompt", min=2, max=most)
        own = [{2: Dim("capacity", min=2, max=most)}] * layers
        cross = [{2: Dim("prompt_capacity", min=2, max=most)}] * layers
        return None, None, {0: width}, {0: prompt_width}, own, own, cross, cross

    def decoder_layers(self) -> nn.Module:
        return self.decoder.layers


class CompiledLayers(nn.Module):
    """``EncoderDecoderStep.layers`` with the step's state as inputs: what
    ``compiled_step`` exports."""

    def __init__(self, step: EncoderDecoderStep) -> None:
        super().__init__()
        self.model = step.model  # a submodule: its weights are the program's parameters
        self.layers = step.layers


class OneRowDecoderLayers(CompiledLayers):
    """The layers for row 0 alone.

    Inputs: the row's (1, 1, d_model) embedded token, its (1,) position, a tensor as
    long as the reply so far and one as long as its prompt (their lengths are the
    attentions' widths, dynamic), and each layer's (1, heads, capacity, head_dim) key
    and value buffers, the reply's (written in place) and the prompt's."""

    def forward(
        self,
        hidden: torch.Tensor,
        position: torch.Tensor,
        width_of: torch.Tensor,
        prompt_width_of: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
    ) -> torch.Tensor:
        width, prompt_width = width_of.shape[0], prompt_width_of.shape[0]
        slots, cross = RowSlots.over(keys, values), RowSlots.over(cross_keys, cross_values)
        own, prompt = Runs([Run(slice(0, 1), width)]), Runs([Run(slice(0, 1), prompt_width)])
        rows = DecoderRows(slots.at(position), own, width, prompt, prompt_width)
        return self.layers(hidden, rows, slots, cross)


class BatchDecoderLayers(CompiledLayers):
    """The layers for rows 0..n-1 (``OneRowCompilable.batch_layers``).

    Inputs: the rows' (n, 1, d_model) embedded tokens, their (n,) positions and
    lengths, each row's (n,) prompt row and prompt length, tensors as long as the
    products' padding (``padded_by``), the longest reply and the longest prompt, and
    each layer's whole key and value buffers, the replies' (written in place) and the
    prompts'."""

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        prompt_rows: torch.Tensor,
        prompt_lengths: torch.Tensor,
        padding_of: torch.Tensor,
        width_of: torch.Tensor,
        prompt_width_of: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
    ) -> torch.Tensor:
        slots, cross = RowSlots.over(keys, values), RowSlots.over(cross_keys, cross_values)
        own, prompt = Runs.of_rows(lengths), Runs.of_rows(prompt_lengths, prompt_rows)
        width, prompt_width = width_of.shape[0], prompt_width_of.shape[0]
        rows = DecoderRows(slots.at(positions), own, width, prompt, prompt_width)
        with padded_by(padding_of.shape[0]):
            return self.layers(hidden, rows, slots, cross)
