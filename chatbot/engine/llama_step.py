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
  ``scaled_dot_product_attention`` called as transformers' SDPA attention calls it.

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
from chatbot.engine.model_step import DecoderOnlyStep, _Run, _runs, attend_by_run


def rms_norm(norm: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``: torch's own ``rms_norm`` in float32 (the operations
    ``LlamaRMSNorm`` makes one by one), the module itself in any other dtype, where it
    rounds in between."""
    if x.dtype == norm.weight.dtype == torch.float32:
        return functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def side_by_side(module: nn.Module, names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One call for the projections ``names`` of ``module``, their outputs side by
    side: the product they share when stacked (``kernels.fused``), else each one's."""
    parts = [getattr(module, name) for name in names]
    first = parts[0]
    if isinstance(first, ProjectionPart) and [(p.shared, p.index) for p in parts] == [
        (first.shared, index) for index in range(len(first.shared.sizes))
    ]:
        return first.shared.product
    return lambda x: torch.cat([part(x) for part in parts], dim=-1)


@dataclass(frozen=True)
class _LayerCalls:
    """A decoder layer's stacked products and attention call, found once."""

    queries_keys_values: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """transformers' SDPA attention for one query and no mask (``use_gqa_in_sdpa``)."""
    heads: tuple[int, int]
    """Query heads, key/value heads."""
    intermediate: int

    @classmethod
    def of(cls, layer: LlamaDecoderLayer) -> _LayerCalls:
        attention, mlp = layer.self_attn, layer.mlp
        query_heads = attention.q_proj.out_features // attention.head_dim
        grouped = attention.num_key_value_groups > 1
        return cls(
            side_by_side(attention, ("q_proj", "k_proj", "v_proj")),
            side_by_side(mlp, ("gate_proj", "up_proj")),
            partial(
                functional.scaled_dot_product_attention,
                scale=attention.scaling,
                enable_gqa=grouped,
            ),
            (query_heads, query_heads // attention.num_key_value_groups),
            mlp.gate_proj.out_features,
        )


class _Rotation(NamedTuple):
    """Every row's rotary embedding at its new position, as (n, 1, 1, head_dim)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    """The sines, the first half negated."""

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> _Rotation:
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cls(cos.unsqueeze(1), signed.unsqueeze(1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``apply_rotary_pos_emb`` of (n, heads, 1, head_dim) ``x``."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.signed_sin


class _StepRows(NamedTuple):
    """What every layer of one step needs to know of its rows."""

    at: tuple[torch.Tensor, torch.Tensor]
    """Where their keys and values go (``RowSlots.at``)."""
    rotation: _Rotation
    runs: list[_Run]
    """Each reply's rows and length (``attend_by_run``)."""
    width: int
    """The longest reply's length."""


class LlamaStep(DecoderOnlyStep):
    """``DecoderOnlyStep`` with a hand-written ``decode``."""

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """Llama's own classes, which this step's ``decode`` restates."""
        return type(model) is LlamaForCausalLM

    def __init__(self, model: PreTrainedModel, positions: int) -> None:
        super().__init__(model, positions)
        self.layers = [_LayerCalls.of(layer) for layer in model.model.layers]

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        width = int(positions.max()) + 1
        self.slots.reserve(tokens.shape[0], width)
        body = self.model.model
        hidden = body.embed_tokens(tokens)
        rotation = _Rotation.of(*body.rotary_emb(hidden, positions[:, None]))
        runs = _runs((positions + 1).tolist(), replies)
        step = _StepRows(self.slots.at(positions), rotation, runs, width)
        for layer, calls in zip(body.layers, self.layers, strict=True):
            states = rms_norm(layer.input_layernorm, hidden)
            hidden = hidden + self._attend(layer, calls, states, step)
            states = rms_norm(layer.post_attention_layernorm, hidden)
            gate, up = calls.gate_up(states).split(calls.intermediate, dim=-1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return self.model.lm_head(rms_norm(body.norm, hidden))

    def _attend(
        self, layer: LlamaDecoderLayer, calls: _LayerCalls, states: torch.Tensor, step: _StepRows
    ) -> torch.Tensor:
        """``LlamaAttention.forward`` for one new position per row: (n, hidden) states,
        viewed as the model's (n, heads, 1, head_dim)."""
        attention = layer.self_attn
        n, head_dim = states.shape[0], attention.head_dim
        projected = calls.queries_keys_values(states).view(n, -1, 1, head_dim)
        query_heads, kv_heads = calls.heads
        rotated = step.rotation.apply(projected[:, : query_heads + kv_heads])
        query, keys = rotated.split(calls.heads, dim=1)
        values = projected[:, query_heads + kv_heads :]
        self.slots.write(attention.layer_idx, step.at, keys, values)
        keys, values = self.slots.view(attention.layer_idx, n, step.width)
        out = attend_by_run(step.runs, query, keys, values, calls.attend)
        return attention.o_proj(out.reshape(n, -1))
