"""Each reply's own decoding in a step of the decode loop, against transformers' way.

After the model step, every reply applies its logits processors, picks its token and
asks its stopping criteria (``chatbot.engine.decoding``). At 32 conversations that is
32 small calls per step, with nothing batched. This times those calls alone (no model:
the logits are drawn once, before), for the 400M Blenderbot's generation config
(greedy, 32 new tokens, its own minimum length, n-gram rules and forced end token),
two ways in turns on the same logits:

- ``transformers``: what ``generate`` does per step for a batch of one (its
  ``LogitsProcessorList`` on the ids so far, ``argmax``, ``torch.cat``, its
  ``StoppingCriteriaList``), with the processors and criteria built for that reply;
- ``engine``: ``SingleRow.advance`` (rules applied by their effect where they only ban
  ids or compare a length), and the loop's gathering of each reply's last token.

Both must choose the same tokens (checked); it prints each one's time per step and
``engine / transformers``.

    python benchmarks/decoding_overhead.py [--replies 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, BlenderbotForConditionalGeneration, GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import real_architecture_checkpoint  # noqa: E402
from chatbot.engine.decoding import SingleRow, start_decoding  # noqa: E402

ROUNDS = 5


def decoding_model() -> BlenderbotForConditionalGeneration:
    """The 400M architecture's configs with one small layer: decoding never runs the
    model, it only builds its processors and criteria from the configs."""
    path = real_architecture_checkpoint()
    config = AutoConfig.from_pretrained(path)
    config.update({"encoder_layers": 1, "decoder_layers": 1, "d_model": 64})
    config.update({"encoder_ffn_dim": 64, "decoder_ffn_dim": 64})
    model = BlenderbotForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def engine_run(replies: list[SingleRow], logits: torch.Tensor) -> list[list[int]]:
    for step_logits in logits:
        torch.tensor([token for reply in replies for token in reply.last_tokens()])
        for row, reply in enumerate(replies):
            reply.advance(step_logits[row : row + 1])
    return [reply.output() for reply in replies]


def transformers_run(replies: list[SingleRow], logits: torch.Tensor) -> list[list[int]]:
    """``generate``'s per-step calls for each reply, with the same processors and
    criteria (``DecodingRules.build`` makes them as ``generate`` does)."""
    ids = [torch.tensor([reply.row.tokens]) for reply in replies]
    for step_logits in logits:
        torch.cat([sequence[:, -1] for sequence in ids])
        for row, reply in enumerate(replies):
            rules = reply.rules
            scores = rules.processors(ids[row], step_logits[row : row + 1])
            token = torch.argmax(scores, dim=-1, keepdim=True)
            ids[row] = torch.cat([ids[row], token], dim=-1)
            rules.stopping(ids[row], scores)
    return [sequence[0, 1:].tolist() for sequence in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = decoding_model()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 8000, (1, 40), generator=generator) for _ in range(args.replies)]
    start = torch.tensor([[model.config.decoder_start_token_id]])
    options = {"num_beams": 1, "max_new_tokens": args.tokens, "min_new_tokens": args.tokens}
    shape = (args.tokens, args.replies, model.config.vocab_size)
    logits = torch.randn(shape, generator=generator)

    def replies() -> list[SingleRow]:
        made = [start_decoding(model, options, prompt, start) for prompt in prompts]
        return [reply for reply in made if isinstance(reply, SingleRow)]

    best = {"transformers": float("inf"), "engine": float("inf")}
    chosen: dict[str, list[list[int]]] = {}
    for _ in range(ROUNDS):
        for name, run in (("transformers", transformers_run), ("engine", engine_run)):
            fresh = replies()
            began = time.perf_counter()
            chosen[name] = run(fresh, logits)
            best[name] = min(best[name], (time.perf_counter() - began) / args.tokens)
    assert chosen["engine"] == chosen["transformers"], "the two ways chose other tokens"
    print(f"{args.replies} replies of {args.tokens} tokens, best of {ROUNDS} rounds, per step:")
    for name, seconds in best.items():
        print(f"  {name:12s} {seconds * 1e3:7.2f} ms")
    print(f"engine / transformers: {best['engine'] / best['transformers']:.2f}")


if __name__ == "__main__":
    main()
