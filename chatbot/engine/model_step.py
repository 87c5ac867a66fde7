"""One decoder step for every running row, whatever position each row has reached.

``generate`` advances a batch whose rows all sit at the same position. The decode loop
mixes rows that joined at different steps, so each row brings its own position and
attends only to its own filled keys: both steps attend each reply over its own length
(``attend_by_run``), in one call of a kernel that computes every row alone
(``kernels.attention``), or in SDPA's call for that reply alone (SDPA's result for a row
depends on the width and the batch it is computed in, so one masked call would not be
exact). ``generate`` attends through the same function (``attend_per_reply``).

* ``EncoderDecoderStep`` (Blenderbot, ``encoder_decoder_step``): admitting a reply
  runs the encoder and projects the cross-attention keys/values once, into one row
  that all the reply's beams read (``Run.shared_row``); each step then runs the
  decoder layers by hand.
* ``DecoderOnlyStep`` (Llama, SmolLM2, Qwen...): admitting a reply runs its prompt
  through the model as ``generate`` would and copies the keys/values into its rows;
  each step is the model's own forward with per-row ``position_ids``, a cache that
  writes into the rows, and an attention function registered with transformers
  (``PER_REPLY``) that attends reply by reply too. Any transformers causal LM whose
  attention goes through transformers' attention interface works unchanged.

Replies admitted together run their prompts in one pass, side by side
(``PackedPrompts``): one call of each product for all of them (28% faster here than
one pass each, for 32 bench prompts of either family), attention prompt by prompt, so
each prompt's values are still its pass alone's.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatbot.engine.kernels import attention
from chatbot.engine.kernels.rows import MAX_ROWS_PER_CALL, PackedLinear, row_bucket
from chatbot.engine.kv_cache import RoundingCache
from chatbot.engine.slots import RowSlots


class ModelStep(ABC):
    """The model's part of the loop: admit prompts into rows, advance rows one token."""

    slots: RowSlots

    def __init__(self, model: PreTrainedModel, stored: torch.dtype) -> None:
        self.model = model
        self.device = model.device
        self.stored = stored
        """What the key/value slots hold (``ChatEngine.cache_dtype``)."""
        model.set_attn_implementation(PER_REPLY)  # admit's spans and decode's runs go to it
        self.packs_prompts = all(map(_prompt_rows_alone, model.modules()))
        """Whether prompts share a pass (``PackedPrompts``): where every product computes
        a prompt's rows alone (all linear layers packed, ``kernels``; not a GPU's)."""

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

    def prompt_passes(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The indexes of ``prompts`` that share each prompt pass (``packed_prompts``),
        or one pass each where the products would give a prompt other values beside
        others (``packs_prompts``)."""
        if self.packs_prompts:
            return packed_prompts(prompts)
        return [[index] for index in range(len(prompts))]

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

    def _make_room(self, positions: torch.Tensor, replies: Sequence[int]) -> tuple[int, Runs]:
        """Room in the key/value buffers for every row's new position: the widest
        row's length, and each reply's run (``attend_by_run``)."""
        lengths = (positions + 1).tolist()
        width = max(lengths)
        self.slots.reserve(len(lengths), width)
        self.slots.advance([length - 1 for length in lengths])
        return width, _runs(lengths, replies)


def _prompt_rows_alone(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):  # cuBLAS, MKL: other sums for other row counts
        return False
    return not isinstance(module, PackedLinear) or module.prompt_rows_alone


class OneRowCompilable(ModelStep):
    """A step whose layers can be exported and compiled ahead of time
    (``compiled_step``), for a single row and for a batch of rows: one conversation's
    step is mostly small operations, and a batch's spends a fifth of its time between
    them, which a compiled package runs in one C++ function. Each step says what is
    exported and how its state goes in."""

    compiled_name = ""
    """The family's name, first in its packages' file names."""
    one_row: Callable[..., torch.Tensor] | None = None
    """Set once a compiled package gave the eager layers' values bit for bit
    (``compiled_step.attach``): steps of one row then run it."""
    batch: Callable[..., torch.Tensor] | None = None
    """The same for ``batch_layers``: steps of 2 to ``MAX_ROWS_PER_CALL`` rows run it."""

    @abstractmethod
    def one_row_layers(self) -> torch.nn.Module:
        """What is exported: the layers for row 0 alone, the step's state as inputs
        (its key/value buffers, written in place), eager."""

    @abstractmethod
    def example_inputs(self, width: int, capacity: int) -> tuple:
        """Inputs of ``one_row_layers`` for a row ``width`` positions long whose earlier
        keys and values are random, in fresh buffers of ``capacity`` positions: the same
        values for the same arguments."""

    @abstractmethod
    def dynamic_shapes(self) -> tuple:
        """``torch.export``'s dynamic dimensions of the inputs: lengths and capacities."""

    @abstractmethod
    def batch_layers(self) -> torch.nn.Module:
        """What is exported for a batch: the layers for rows 0..n-1, each row's length
        (and prompt) as tensors, the step's whole key/value buffers as inputs. It
        attends with ``kernels.attention`` alone (``Runs.of_rows``), and pads every
        product's rows to their bucket by an input's length (``padded_by``)."""

    @abstractmethod
    def batch_example_inputs(self, rows: int, width: int, capacity: int) -> tuple:
        """Inputs of ``batch_layers`` for ``rows`` rows, the longest ``width`` positions
        long, in fresh random buffers of ``capacity`` positions (and ``rows + 1``
        rows): the same values for the same arguments."""

    @abstractmethod
    def batch_dynamic_shapes(self) -> tuple:
        """``torch.export``'s dynamic dimensions of ``batch_layers``' inputs."""

    @abstractmethod
    def decoder_layers(self) -> torch.nn.Module:
        """The modules whose products the package computes."""

    @staticmethod
    def batch_takes(rows: int) -> bool:
        """Whether a compiled batch takes a step of ``rows`` rows (one call of each
        product: ``MAX_ROWS_PER_CALL`` rows at most)."""
        return 2 <= rows <= MAX_ROWS_PER_CALL


def length_carrier(length: int, device: torch.device) -> torch.Tensor:
    """A (length, 0) tensor: no data, only a length, which a compiled one-row step
    takes as an input (a width that changes every step)."""
    return torch.empty((length, 0), device=device)


def padding_carrier(rows: int, device: torch.device) -> torch.Tensor:
    """The rows ``row_bucket`` pads a product of ``rows`` rows by, as a compiled
    batch's input (``padded_by``)."""
    return length_carrier(row_bucket(rows) - rows, device)


def batch_dims() -> tuple[dict[int, torch.export.Dim], dict[int, torch.export.Dim]]:
    """``torch.export``'s dimensions of a compiled batch's per-row inputs and of its
    padding carrier, alike in every family."""
    rows = torch.export.Dim("rows", min=2, max=MAX_ROWS_PER_CALL)
    return {0: rows}, {0: torch.export.Dim("padding", min=0, max=MAX_ROWS_PER_CALL)}


@dataclass(frozen=True)
class Run:
    """One reply's rows (its beams), which attend over the same number of positions."""

    rows: slice
    length: int
    shared_row: int | None = None
    """The one buffer row that all the run's rows read (a prompt's keys and values,
    which a reply's beams share), or None: each row reads its own."""

    def own(self, buffer: torch.Tensor) -> torch.Tensor:
        """The run's part of a (rows, heads, positions, dim) key or value ``buffer``
        over its length: its rows, or its shared row expanded to as many (SDPA reads
        an expanded row as it reads that many copies, to the bit)."""
        if self.shared_row is None:
            return buffer[self.rows, :, : self.length]
        one = buffer[self.shared_row : self.shared_row + 1, :, : self.length]
        return one.expand(self.rows.stop - self.rows.start, -1, -1, -1)


class Runs(tuple[Run, ...]):
    """A step's runs, in row order, which every layer's attention reads alike."""

    @classmethod
    def of_rows(cls, lengths: torch.Tensor, rows: torch.Tensor | None = None) -> Runs:
        """Runs known by each row's length and key row alone (``key_rows``; each its
        own row unless ``rows`` says): a compiled batch's inputs, read by the attention
        kernel only."""
        if rows is None:
            rows = torch.arange(lengths.shape[0], device=lengths.device)
        runs = cls()
        runs.__dict__["key_rows"] = (rows, lengths)
        return runs

    @cached_property
    def key_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's key row and length (``kernels.attention.attend_rows``, on the CPU):
        built once a step, for every layer."""
        if len(self) == 1:  # a compiled step's one row, whose length is symbolic
            run = self[0]
            count = run.rows.stop - run.rows.start
            if run.shared_row is None:
                rows = torch.arange(run.rows.start, run.rows.stop)
            else:
                rows = torch.full((count,), run.shared_row)
            return rows, torch.full((count,), run.length)
        rows_read: list[int] = []
        lengths: list[int] = []
        for run in self:
            count = run.rows.stop - run.rows.start
            if run.shared_row is None:
                rows_read.extend(range(run.rows.start, run.rows.stop))
            else:
                rows_read.extend([run.shared_row] * count)
            lengths.extend([run.length] * count)
        return torch.tensor(rows_read), torch.tensor(lengths)


def _runs(lengths: list[int], replies: Sequence[int]) -> Runs:
    """Each reply's block of rows, with its length (``lengths`` has one per row)."""
    runs, first = [], 0
    for count in replies:
        runs.append(Run(slice(first, first + count), lengths[first]))
        first += count
    return Runs(runs)


def attend_by_run(
    runs: Runs,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """(n, heads, 1, dim) ``query``'s rows, each reply's over its own length, in row
    order: all in one call of ``kernels.attention`` where it runs, else ``attend(query,
    keys, values)`` (SDPA, with ``scale``) once per reply. One SDPA call for the whole
    batch (the widest row's length, the rest masked) sums in another order: its result
    for a row depends on the width and on the batch size (up to 4.8e-7 apart, enough to
    flip an int8 activation's rounding), so a reply would depend on the replies beside
    it. The calls per reply are those ``generate`` makes for each reply alone. SDPA
    gets a bfloat16 cache (``precision.Precision.cache``) widened to float32."""
    if attention.applies(query, keys):
        rows, lengths = runs.key_rows
        return attention.attending()(query, keys, values, rows, lengths, scale)
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    alone = runs[0] if len(runs) == 1 else None
    if alone and alone.length == keys.shape[2] and alone.shared_row is None:  # all of them
        return attend(query, keys, values)
    return torch.cat([attend(query[run.rows], run.own(keys), run.own(values)) for run in runs])


PROMPT_TOKENS_PER_PASS = 1024
"""The most prompt tokens one prompt pass packs side by side (``packed_prompts``): it
bounds the pass's activations (Blenderbot-400M's widest, 1,024 x 5,120 floats, 21 MB)
while their products already run as few, full calls."""


@dataclass(frozen=True)
class PackedPrompts:
    """Prompts side by side in one (1, total) sequence, each from position 0: one
    prompt pass for all of them. Every product computes each row alone (``kernels``),
    and attention runs once per prompt (``spans``, read by ``attend_per_reply``), so
    each prompt gets the values of its pass alone, to the bit."""

    ids: torch.Tensor
    """(1, total) token ids."""
    positions: torch.Tensor
    """(1, total) each token's position in its own prompt."""
    spans: tuple[slice, ...]
    """Each prompt's positions in the sequence."""

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], device: torch.device) -> PackedPrompts:
        lengths = [len(prompt) for prompt in prompts]
        ends = list(itertools.accumulate(lengths))
        ids = torch.tensor([[token for prompt in prompts for token in prompt]], device=device)
        positions = torch.cat([torch.arange(length, device=device) for length in lengths])
        spans = tuple(slice(end - length, end) for end, length in zip(ends, lengths, strict=True))
        return cls(ids, positions[None], spans)

    @property
    def lasts(self) -> torch.Tensor:
        """Each prompt's last position in the sequence (whose logits a reply starts from)."""
        return torch.tensor([span.stop - 1 for span in self.spans], device=self.ids.device)


def packed_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The indexes of ``prompts`` in groups of at most ``PROMPT_TOKENS_PER_PASS`` tokens
    (a longer prompt alone), in order: one prompt pass a group. A one-token prompt
    passes alone: its single position has a decode step's shape, which a kernel may
    multiply otherwise than a prompt's (``Int4Linear``), as ``generate`` does it."""
    groups: list[list[int]] = []
    tokens = PROMPT_TOKENS_PER_PASS  # full: the first prompt opens a pass
    for index, prompt in enumerate(prompts):
        alone = len(prompt) == 1
        if alone or tokens + len(prompt) > PROMPT_TOKENS_PER_PASS:
            groups.append([])
            tokens = 0
        groups[-1].append(index)
        tokens = PROMPT_TOKENS_PER_PASS if alone else tokens + len(prompt)
    return groups


PER_REPLY = "chatbot_per_reply"
"""The attention implementation of every model the engine loads (``ChatEngine``), so
that ``generate`` and the decode loop attend alike."""


def attend_per_reply(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    runs: Runs | None = None,
    spans: Sequence[slice] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one new position per row, each reply's rows over the reply's own
    length (``attend_by_run``): the decode loop's step passes ``runs``; ``generate``'s
    steps (every row as long as the others, no mask) are one run. Prompts packed side
    by side (``PackedPrompts``) pass their ``spans``: each attends alone, unmasked, as
    its pass alone would; so do the prompts of ``generate``'s padded batches
    (``_prompt_lengths``), in the encoder and in cross-attention. Anything else (a
    decoder-only batch padded on the left) is transformers' SDPA attention, as it would
    be, over the cache's keys and values widened to the query's dtype
    (``precision.Precision.cache``)."""
    if spans is not None:
        key, value = key.to(query.dtype), value.to(query.dtype)
        return torch.cat(
            [
                sdpa_attention_forward(
                    module, query[:, :, span], key[:, :, span], value[:, :, span], None, **kwargs
                )[0]
                for span in spans
            ],
            dim=1,
        ), None
    if runs is None:
        lengths = _prompt_lengths(attention_mask, query.shape[0])
        if lengths is not None and query.shape[2] > 1:
            return _each_prompt_alone(module, query, key, value, lengths, **kwargs), None
        runs = _generate_runs(query, key, attention_mask, lengths)
    if runs is None:
        key, value = key.to(query.dtype), value.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0].transpose(1, 2)

    scale = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return attend_by_run(runs, query, key, value, unmasked, scale).transpose(1, 2), None


def _prompt_lengths(attention_mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Each of the ``rows`` rows' length where ``attention_mask`` is a padded batch of
    ``generate``'s prompts padded on the right, read with no causal mask (an encoder's,
    and the decoder's cross-attention): every position of a row keeps the row's first
    positions, one at least. None for any other mask (causal, padded on the left,
    additive)."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    kept = attention_mask[:, 0]  # (rows, query positions, key positions)
    if not kept[:, :, 0].all():  # padded on the left: one check, at every decode step
        return None
    lengths = kept[:, 0].sum(dim=1)
    prefixes = torch.arange(kept.shape[-1], device=kept.device) < lengths[:, None]
    if not torch.equal(kept, prefixes[:, None].expand_as(kept)):
        return None
    return lengths.expand(rows)


def _each_prompt_alone(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """An encoder's attention over a padded batch of prompts (``_prompt_lengths``), each
    prompt's positions over its own, as its pass alone computes them (keys and values
    in the query's dtype, as SDPA takes them); padding stays zeros (no later product
    reads it: ``skip_redundant_rows``)."""
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for row, length in enumerate(lengths.tolist()):
        q, k, v = (t[row : row + 1, :, :length].to(query.dtype) for t in (query, key, value))
        out[row, :length] = sdpa_attention_forward(module, q, k, v, None, **kwargs)[0][0]
    return out


def _generate_runs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
) -> Runs | None:
    """``generate``'s step of one new position per row, as runs: with no mask, every
    row over every position; where a padded batch's cross-attention reads prompts of
    ``lengths`` (``_prompt_lengths``) and the attention kernel takes the step, each
    row over its own prompt, as its conversation alone reads it, with no float32 copy
    of a bfloat16 cache (widening 16 ten-beam replies' prompts at every layer and
    step took a quarter of int8's ``generate``). None: SDPA with the mask (a prompt,
    a decoder-only batch padded on the left)."""
    if query.shape[2] != 1:
        return None
    if attention_mask is None:
        return Runs([Run(slice(0, query.shape[0]), key.shape[2])])
    if lengths is None or not attention.applies(query, key):
        return None
    return Runs.of_rows(lengths)


AttentionInterface.register(PER_REPLY, attend_per_reply)
AttentionMaskInterface.register(PER_REPLY, sdpa_mask)


class _RowsCache(Cache):
    """Shows one step's rows to a transformers model as its ``past_key_values``."""

    def __init__(self, slots: RowSlots, positions: torch.Tensor, width: int) -> None:
        super().__init__(layers=[])
        self.slots, self.at, self.width = slots, slots.at(positions), width

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.slots.write(layer_idx, self.at, key_states, value_states)
        return self.slots.view(layer_idx, key_states.shape[0], self.width)


class DecoderOnlyStep(ModelStep):
    def __init__(self, model: PreTrainedModel, positions: int, stored: torch.dtype) -> None:
        super().__init__(model, stored)
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        heads = config.num_key_value_heads or heads  # grouped-query attention caches fewer
        shape = (config.num_hidden_layers, heads, positions, head_dim, self.stored, self.device)
        self.slots = RowSlots(*shape)

    def admit(self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]):
        passes = [
            self._prompt_pass(
                [prompts[i] for i in group], [firsts[i] for i in group], [copies[i] for i in group]
            )
            for group in self.prompt_passes(prompts)
        ]
        return torch.cat(passes)

    def _prompt_pass(
        self, prompts: Sequence[Sequence[int]], firsts: Sequence[int], copies: Sequence[int]
    ) -> torch.Tensor:
        """Run ``prompts`` through the model side by side (``PackedPrompts``), as
        ``generate`` runs each alone, and copy each one's keys and values into its rows;
        each row's logits of its reply's first token."""
        packed = PackedPrompts.of(prompts, self.device)
        cache = RoundingCache(self.model.config, self.stored)
        logits = self.model(
            input_ids=packed.ids,
            position_ids=packed.positions,
            past_key_values=cache,
            logits_to_keep=packed.lasts,
            spans=packed.spans,
        ).logits[0]
        for layer, cached in enumerate(cache.layers):
            keys, values = getattr(cached, "keys", None), getattr(cached, "values", None)
            if keys is None or values is None:
                raise TypeError(f"cache layer {layer} holds no keys: not an attention model")
            for span, first, count in zip(packed.spans, firsts, copies, strict=True):
                rows = slice(first, first + count)
                self.slots.fill(layer, rows, keys[:, :, span], values[:, :, span])
        return logits.repeat_interleave(torch.tensor(copies, device=self.device), dim=0)

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
