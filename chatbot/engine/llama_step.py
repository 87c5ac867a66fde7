"""The decode loop's step for Llama-architecture models (SmolLM2, Llama), written out.

``DecoderOnlyStep`` runs a step through the model's own ``forward``, which serves every
causal LM but at one conversation spends more time in its generality than in the
multiplies: per layer, the mask and cache interfaces, keyword plumbing and output
hooks; about 7,700 torch operations a SmolLM2 token, 42% of its time. This step
computes the same values with the same arithmetic in the same order, so its logits are
the model's own to the bit (the decode-loop tests compare every reply with
``generate``'s), in fewer calls:

* the projections of one input in one product (``kernels.fused``), the queries' and
  keys' rotary embedding in one pass over both;
* the rotation written as ``x * cos + roll(x) * signed_sin``: ``rotate_half(x) * sin``
  multiplies ``-x2`` by ``sin``, this ``x2`` by ``-sin``, which IEEE arithmetic rounds
  alike, in 4 operations instead of 7;
* torch's ``rms_norm`` for ``LlamaRMSNorm`` (the same operations, in C++) and
  ``scaled_dot_product_attention`` called as transformers' SDPA attention calls it;
* the kernels called, not the modules: a packed layer's ``rows`` skips the module
  call and the checks a prompt needs (four products a layer, 120 a SmolLM2 token), and
  the rotary embedding of every position is computed once, at load.

Prompts still go through the model's ``forward``, as ``generate``'s do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from chatbot.engine.kernels.fused import ProjectionPart
from chatbot.engine.kernels.rows import PackedLinear, padded_by
from chatbot.engine.model_step import (
    DecoderOnlyStep,
    OneRowCompilable,
    Run,
    Runs,
    attend_by_run,
    batch_dims,
    length_carrier,
    padding_carrier,
)
from chatbot.engine.slots import RowSlots

Product = Callable[[torch.Tensor], torch.Tensor]


def rows_product(linear: nn.Module) -> Product:
    """``linear`` on a decode step's (n, in) rows: a packed layer's ``rows``, which
    skips the module call and what only prompts need; any other layer itself."""
    return linear.rows if isinstance(linear, PackedLinear) else linear


def added_product(linear: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``residual + linear(x)`` on a decode step's rows: a packed layer's ``add_rows``."""
    if isinstance(linear, PackedLinear):
        return linear.add_rows
    return lambda residual, x: residual + linear(x)


def norm_of(norm: LlamaRMSNorm) -> Product:
    """``norm``: torch's own ``rms_norm`` in float32 (the operations ``LlamaRMSNorm``
    makes one by one), the module itself in any other dtype, where it rounds in
    between."""
    weight = norm.weight
    if weight.dtype != torch.float32:
        return norm
    return partial(
        functional.rms_norm,
        normalized_shape=weight.shape,
        weight=weight,
        eps=norm.variance_epsilon,
    )


def side_by_side(module: nn.Module, names: Sequence[str]) -> Product:
    """One call for the projections ``names`` of ``module``, their outputs side by
    side: the product they share when stacked (``kernels.fused``), else each one's."""
    parts = [getattr(module, name) for name in names]
    first = parts[0]
    if isinstance(first, ProjectionPart) and [(p.shared, p.index) for p in parts] == [
        (first.shared, index) for index in range(len(first.shared.sizes))
    ]:
        return rows_product(first.shared.product)
    products = [rows_product(part) for part in parts]
    return lambda x: torch.cat([product(x) for product in products], dim=-1)


@dataclass(frozen=True)
class _Layer:
    """What a decoder layer's step calls, found once."""

    index: int
    input_norm: Product
    queries_keys_values: Product
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """transformers' SDPA attention for one query and no mask (``use_gqa_in_sdpa``)."""
    scale: float
    add_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    post_attention_norm: Product
    gate_up: Product
    """The gate's and up projection's outputs side by side, as wide as each other."""
    activation: Product
    add_down: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    heads: tuple[int, int]
    """Query heads, key/value heads."""
    head_dim: int

    @classmethod
    def of(cls, layer: LlamaDecoderLayer) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        query_heads = attention.q_proj.out_features // attention.head_dim
        grouped = attention.num_key_value_groups > 1
        return cls(
            attention.layer_idx,
            norm_of(layer.input_layernorm),
            side_by_side(attention, ("q_proj", "k_proj", "v_proj")),
            partial(
                functional.scaled_dot_product_attention,
                scale=attention.scaling,
                enable_gqa=grouped,
            ),
            attention.scaling,
            added_product(attention.o_proj),
            norm_of(layer.post_attention_layernorm),
            side_by_side(mlp, ("gate_proj", "up_proj")),
            mlp.act_fn,
            added_product(mlp.down_proj),
            (query_heads, query_heads // attention.num_key_value_groups),
            attention.head_dim,
        )


class Rotation(NamedTuple):
    """Rotary embeddings, as (n, 1, 1, head_dim): ``apply`` broadcasts them over heads."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    """The sines, the first half negated."""

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotation:
        """From the model's (1, n, head_dim) ``rotary_emb`` output."""
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cls(cos[0, :, None, None], signed[0, :, None, None])

    def at(self, positions: torch.Tensor) -> Rotation:
        return Rotation(self.cos[positions], self.signed_sin[positions])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``apply_rotary_pos_emb`` of (n, heads, 1, head_dim) ``x``."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.signed_sin


class StepRows(NamedTuple):
    """What every layer of one step needs to know of its rows."""

    at: tuple[torch.Tensor, torch.Tensor]
    """Where their keys and values go (``RowSlots.at``)."""
    rotation: Rotation
    runs: Runs
    """Each reply's rows and length (``attend_by_run``)."""
    width: int
    """The longest reply's length."""


class LlamaLayers:
    """A Llama model's decoder layers and final norm, for one new position per row:
    what ``LlamaStep.decode`` runs between the embedding and the LM head, on any key/
    value slots (``compiled_step`` exports it for one row)."""

    def __init__(self, model: PreTrainedModel) -> None:
        body = model.model
        self.layers = [_Layer.of(layer) for layer in body.layers]
        self.final_norm = norm_of(body.norm)

    def __call__(self, hidden: torch.Tensor, step: StepRows, slots: RowSlots) -> torch.Tensor:
        for layer in self.layers:
            states = self._attend(layer, layer.input_norm(hidden), step, slots)
            hidden = layer.add_output(hidden, states)
            gate, up = layer.gate_up(layer.post_attention_norm(hidden)).chunk(2, dim=-1)
            hidden = layer.add_down(hidden, layer.activation(gate) * up)
        return self.final_norm(hidden)

    @staticmethod
    def _attend(
        layer: _Layer, states: torch.Tensor, step: StepRows, slots: RowSlots
    ) -> torch.Tensor:
        """``LlamaAttention.forward`` up to its output projection, for one new position
        per row: (n, hidden) states, viewed as the model's (n, heads, 1, head_dim)."""
        n = states.shape[0]
        projected = layer.queries_keys_values(states).view(n, -1, 1, layer.head_dim)
        query_heads, kv_heads = layer.heads
        rotated = step.rotation.apply(projected[:, : query_heads + kv_heads])
        query, keys = rotated.split_with_sizes(layer.heads, dim=1)
        values = projected[:, query_heads + kv_heads :]
        slots.write(layer.index, step.at, keys, values)
        keys, values = slots.view(layer.index, n, step.width)
        out = attend_by_run(step.runs, query, keys, values, layer.attend, layer.scale)
        return out.reshape(n, -1)


class CompiledLayers(nn.Module):
    """``LlamaLayers`` with the step's state as inputs: what ``compiled_step`` exports."""

    def __init__(self, model: PreTrainedModel, layers: LlamaLayers) -> None:
        super().__init__()
        self.model = model  # a submodule: its weights are the program's parameters
        self.layers = layers


class OneRowLayers(CompiledLayers):
    """The layers for row 0 alone.

    Inputs: the row's (1, hidden) embedding, its rotation, its (1,) position, a tensor
    as long as the reply so far (its length is the attention's width, dynamic), and each
    layer's (1, heads, capacity, head_dim) key and value buffers (written in place)."""

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        position: torch.Tensor,
        width_of: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        width, slots = width_of.shape[0], RowSlots.over(keys, values)
        at = slots.at(position)
        step = StepRows(at, Rotation(cos, signed_sin), Runs([Run(slice(0, 1), width)]), width)
        return self.layers(hidden, step, slots)


class BatchLayers(CompiledLayers):
    """The layers for rows 0..n-1 (``OneRowCompilable.batch_layers``).

    Inputs: the rows' (n, hidden) embeddings, their rotations, (n,) positions and
    lengths, tensors as long as the products' padding (``padded_by``) and the longest
    reply, and each layer's whole key and value buffers (written in place)."""

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        padding_of: torch.Tensor,
        width_of: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        slots = RowSlots.over(keys, values)
        runs = Runs.of_rows(lengths)
        step = StepRows(slots.at(positions), Rotation(cos, signed_sin), runs, width_of.shape[0])
        with padded_by(padding_of.shape[0]):
            return self.layers(hidden, step, slots)


class LlamaStep(DecoderOnlyStep, OneRowCompilable):
    """``DecoderOnlyStep`` with a hand-written ``decode``."""

    compiled_name = "llama"

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """Llama's own classes, which this step's ``decode`` restates, with a rotary
        embedding that does not change with the sequence's length (a table holds it)."""
        if type(model) is not LlamaForCausalLM:
            return False
        rope_type = model.model.rotary_emb.rope_type
        return "dynamic" not in rope_type and rope_type != "longrope"

    def __init__(self, model: PreTrainedModel, positions: int, stored: torch.dtype) -> None:
        super().__init__(model, positions, stored)
        body = model.model
        self.embed, self.layers = body.embed_tokens, LlamaLayers(model)
        self.head = rows_product(model.lm_head)
        # Every position's rotation once: the model computes each position's alone, as
        # one product and an elementwise cos and sin, so a table holds the same values.
        every = torch.arange(positions, device=self.device)[None]
        hidden = torch.zeros(1, dtype=model.dtype, device=self.device)
        self.rotation = Rotation.of(*body.rotary_emb(hidden, every))

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        width, runs = self._make_room(positions, replies)
        hidden, rotation = self.embed(tokens), self.rotation.at(positions)
        one_row, batch, n = self.one_row, self.batch, tokens.shape[0]
        if one_row is not None and n == 1:
            hidden = one_row(*self._one_row_inputs(hidden, rotation, positions, width, self.slots))
        elif batch is not None and self.batch_takes(n) and width >= 2:
            hidden = batch(*self._batch_inputs(hidden, rotation, positions, width, self.slots))
        else:
            step = StepRows(self.slots.at(positions), rotation, runs, width)
            hidden = self.layers(hidden, step, self.slots)
        return self.head(hidden)

    @staticmethod
    def _one_row_inputs(
        hidden: torch.Tensor,
        rotation: Rotation,
        position: torch.Tensor,
        width: int,
        slots: RowSlots,
    ) -> tuple:
        width_of = length_carrier(width, hidden.device)
        return hidden, rotation.cos, rotation.signed_sin, position, width_of, *slots.row_views()

    @staticmethod
    def _batch_inputs(
        hidden: torch.Tensor,
        rotation: Rotation,
        positions: torch.Tensor,
        width: int,
        slots: RowSlots,
    ) -> tuple:
        n, device = hidden.shape[0], hidden.device
        return (
            hidden, rotation.cos, rotation.signed_sin, positions, positions + 1,
            padding_carrier(n, device), length_carrier(width, device), *slots.buffers(),
        )  # fmt: skip

    def one_row_layers(self) -> nn.Module:
        return OneRowLayers(self.model, self.layers)

    def batch_layers(self) -> nn.Module:
        return BatchLayers(self.model, self.layers)

    def batch_example_inputs(self, rows: int, width: int, capacity: int) -> tuple:
        """Row 0 is the longest."""
        generator = torch.Generator().manual_seed(0)
        slots = self.slots.random_rows(capacity, generator, rows + 1)
        hidden_size = self.embed.weight.shape[1]
        hidden = torch.randn(rows, hidden_size, generator=generator).to(self.device)
        positions = torch.randint(0, width, (rows,), generator=generator)
        positions[0] = width - 1
        positions = positions.to(self.device)
        return self._batch_inputs(hidden, self.rotation.at(positions), positions, width, slots)

    def batch_dynamic_shapes(self) -> tuple:
        Dim = torch.export.Dim
        most = self.slots.max_positions
        per_row, padding = batch_dims()
        width = {0: Dim("width", min=2, max=most)}
        capacity = {0: Dim("row_capacity", min=2), 2: Dim("capacity", min=2, max=most)}
        buffers = [capacity] * len(self.slots.keys)
        return per_row, per_row, per_row, per_row, per_row, padding, width, buffers, buffers

    def example_inputs(self, width: int, capacity: int) -> tuple:
        generator = torch.Generator().manual_seed(0)
        slots = self.slots.random_rows(capacity, generator)
        hidden_size = self.embed.weight.shape[1]
        hidden = torch.randn(1, hidden_size, generator=generator).to(self.device)
        position = torch.tensor([width - 1], device=self.device)
        return self._one_row_inputs(hidden, self.rotation.at(position), position, width, slots)

    def dynamic_shapes(self) -> tuple:
        most = self.slots.max_positions
        width = torch.export.Dim("width", min=2, max=most)
        buffers = [{2: torch.export.Dim("capacity", min=2, max=most)}] * len(self.slots.keys)
        return None, None, None, None, {0: width}, buffers, buffers

    def decoder_layers(self) -> nn.Module:
        return self.model.model.layers
