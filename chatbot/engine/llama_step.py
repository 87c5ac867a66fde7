"""The decode loop's step for Llama-architecture models (SmolLM2, Llama), written out.

``DecoderOnlyStep`` runs a step through the model's own ``forward``, which serves every
causal LM but at one conversation spends more time in its generality than in the
multiplies: per layer, the mask and cache interfaces, keyword plumbing and output
hooks; about 7,700 torch operations a SmolLM2 token, 42% of its time. This step calls
the same modules and functions on the same values in the same order (norms,
projections, ``apply_rotary_pos_emb``, the per-reply attention, the MLP), so its
logits are the model's own to the bit (the decode-loop tests compare every reply with
``generate``'s), and leaves out the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from chatbot.engine.model_step import DecoderOnlyStep, _Run, _runs, attend_per_reply


class _StepRows(NamedTuple):
    """What every layer of one step needs to know of its rows."""

    positions: torch.Tensor
    """(n,) each row's new position."""
    rotary: tuple[torch.Tensor, torch.Tensor]
    """(n, 1, head_dim) cosines and sines at those positions."""
    runs: list[_Run]
    """Each reply's rows and length (``attend_by_run``)."""
    width: int
    """The longest reply's length."""


class LlamaStep(DecoderOnlyStep):
    """``DecoderOnlyStep`` with a hand-written ``decode`` (prompts still go through
    the model's ``forward``, as ``generate``'s do)."""

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """Llama's own classes, which this step's ``decode`` restates."""
        return type(model) is LlamaForCausalLM

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, replies: Sequence[int]
    ) -> torch.Tensor:
        width = int(positions.max()) + 1
        self.slots.reserve(tokens.shape[0], width)
        body = self.model.model
        hidden = body.embed_tokens(tokens)
        rotary = body.rotary_emb(hidden, positions[:, None])
        step = _StepRows(positions, rotary, _runs((positions + 1).tolist(), replies), width)
        for layer in body.layers:
            hidden = hidden + self._attend(layer.self_attn, layer.input_layernorm(hidden), step)
            mlp, states = layer.mlp, layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(states)) * mlp.up_proj(states))
        return self.model.lm_head(body.norm(hidden))

    def _attend(self, attention: LlamaAttention, states: torch.Tensor, step: _StepRows):
        """``LlamaAttention.forward`` for one new position per row: (n, hidden) states,
        viewed as the model's (n, heads, 1, head_dim)."""
        n, head_dim, layer = states.shape[0], attention.head_dim, attention.layer_idx
        query = attention.q_proj(states).view(n, -1, 1, head_dim)
        keys = attention.k_proj(states).view(n, -1, 1, head_dim)
        values = attention.v_proj(states).view(n, -1, 1, head_dim)
        query, keys = apply_rotary_pos_emb(query, keys, *step.rotary)
        self.slots.write(layer, step.positions, keys, values)
        keys, values = self.slots.view(layer, n, step.width)
        out, _ = attend_per_reply(
            attention, query, keys, values, None, runs=step.runs, dropout=0.0,
            scaling=attention.scaling,
        )  # fmt: skip
        return attention.o_proj(out.reshape(n, -1))
