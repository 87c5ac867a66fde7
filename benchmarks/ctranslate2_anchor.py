"""CTranslate2, the engine people pick to run a BART-like model fast on a CPU, as an
anchor: the same checkpoint, prompts and lengths, timed in this run.

CTranslate2 ships no Blenderbot converter. Blenderbot is BART-like, and its
differences are all ones CTranslate2's transformer spec has a setting for: pre-norm
layers with a final layer norm in the encoder and the decoder, no layer norm on the
embeddings, embeddings scaled by sqrt(d_model), learned positions without BART's offset
of 2, GELU. ``BlenderbotLoader`` is BART's loader with those settings, and
``token_identity`` proves the conversion: greedy decoding in float32 writes the same
tokens as transformers' ``generate``.

CTranslate2 decodes a list of prompts offline (``translate_batch``): no server, no
HTTP, no scheduling; its batch-N figure is what a perfect batcher of N concurrent
requests could reach with its kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import torch
from ctranslate2.converters import TransformersConverter
from ctranslate2.converters.transformers import BartLoader, register_loader
from transformers import AutoTokenizer, BlenderbotForConditionalGeneration

COMPUTE_TYPES = ("float32", "int8")


@register_loader("BlenderbotConfig")
class BlenderbotLoader(BartLoader):
    @property
    def architecture_name(self) -> str:
        return "BlenderbotForConditionalGeneration"

    def get_model_spec(self, model):
        model.config.normalize_before = True  # pre-norm, with final layer norms
        model.config.normalize_embedding = False
        return super().get_model_spec(model)


def convert(checkpoint: Path, cache: Path) -> Path:
    """The checkpoint in CTranslate2's format (float32 weights; int8 is chosen at
    load), converted once into ``cache``."""
    out = cache / f"ctranslate2-{checkpoint.name}"
    if not (out / "model.bin").exists():
        TransformersConverter(str(checkpoint)).convert(str(out), force=True)
    return out


@dataclass(frozen=True)
class Decoded:
    """What one timed ``translate_batch`` wrote."""

    seconds: float
    outputs: list[list[int]]  # new token ids per prompt, the end token left out

    @property
    def new_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


class Anchor:
    """A converted checkpoint loaded in one compute type, on this machine's threads."""

    def __init__(self, converted: Path, checkpoint: Path, compute_type: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.translator = ctranslate2.Translator(
            str(converted), device="cpu", compute_type=compute_type,
            intra_threads=torch.get_num_threads(), inter_threads=1,
        )  # fmt: skip

    def decode(
        self, prompts: list[list[int]], batch_size: int, new_tokens: int, beams: int = 1, **options
    ) -> Decoded:
        """Exactly ``new_tokens`` per prompt (as the benchmark's checkpoint is configured
        to write), ``batch_size`` prompts at a time."""
        source = [self.tokenizer.convert_ids_to_tokens(p) for p in prompts]
        start = time.perf_counter()
        results = self.translator.translate_batch(
            source, max_batch_size=batch_size, beam_size=beams,
            min_decoding_length=new_tokens, max_decoding_length=new_tokens, **options,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        ids = [self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
        return Decoded(seconds, ids)


def token_identity(
    checkpoint: Path, converted: Path, prompts: list[list[int]], new_tokens: int
) -> tuple[int, int]:
    """(identical, compared): greedy replies of CTranslate2 float32 that are token for
    token those of transformers' ``generate`` (no n-gram rules, no forced end token,
    exactly ``new_tokens``), one prompt at a time."""
    model = BlenderbotForConditionalGeneration.from_pretrained(checkpoint).eval()
    ours = Anchor(converted, checkpoint, "float32").decode(prompts, 1, new_tokens).outputs
    same = 0
    with torch.inference_mode():
        for prompt, theirs in zip(prompts, ours, strict=True):
            written = model.generate(
                torch.tensor([prompt]), num_beams=1, do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
                forced_eos_token_id=None, length_penalty=1.0,
            )  # fmt: skip
            same += written[0, 1:].tolist() == theirs
    return same, len(prompts)


@dataclass(frozen=True)
class Job:
    """One workload as CTranslate2 runs it: ``requests`` prompts, ``batch_size`` at a time."""

    workload: str
    requests: int
    batch_size: int
    new_tokens: int
    beams: int = 1
    length_penalty: float = 1.0


def run(checkpoint: Path, converted: Path, prompts: list[list[int]], jobs: list[Job]) -> dict:
    """Every job in each compute type, and the conversion's token identity. Meant for a
    process of its own (``main``): CTranslate2's OpenMP threads and torch's must not
    share the two cores, or each slows the other."""
    timings = []
    for compute_type in COMPUTE_TYPES:
        anchor = Anchor(converted, checkpoint, compute_type)
        anchor.decode(prompts[:2], 2, 4)  # first-call allocations
        for job in jobs:
            decoded = anchor.decode(
                [prompts[i % len(prompts)] for i in range(job.requests)], job.batch_size,
                job.new_tokens, job.beams, length_penalty=job.length_penalty,
                no_repeat_ngram_size=3,  # as the checkpoint's generation config
            )  # fmt: skip
            timings.append(
                {"compute_type": compute_type, "workload": job.workload,
                 "requests": job.requests, "seconds": decoded.seconds,
                 "new_tokens": decoded.new_tokens}
            )  # fmt: skip
    identical, compared = token_identity(checkpoint, converted, prompts[:8], 32)
    return {"timings": timings, "identical": identical, "compared": compared}


def main() -> None:
    """``python ctranslate2_anchor.py SPEC.json``: SPEC names ``checkpoint``, ``cache``,
    ``prompts`` (token ids) and ``jobs``; prints ``run``'s result as JSON."""
    import json
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    checkpoint = Path(spec["checkpoint"])
    converted = convert(checkpoint, Path(spec["cache"]))
    jobs = [Job(**job) for job in spec["jobs"]]
    print(json.dumps(run(checkpoint, converted, spec["prompts"], jobs)))


if __name__ == "__main__":
    main()
