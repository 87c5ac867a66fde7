"""Build small, randomly initialised chat models that work with no internet.

Tests, benchmarks and the offline demo need real checkpoint directories without
downloading one. These are built from parts the project owns: a byte-level BPE
tokenizer trained on the MIT-licensed ``chitchat-dataset`` conversations (7,168 real
chats shipped on PyPI) and a real architecture at small sizes:

* ``encoder-decoder``: Blenderbot, with the real model's special-token ids and
  generation defaults;
* ``decoder-only``: Llama (SmolLM2's architecture) with a ChatML chat template, the
  format of SmolLM2 and Qwen2.5-Instruct.

    python -m chatbot.models.tiny_model OUT_DIR [--family decoder-only] [--vocab-size 2000]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chitchat_dataset
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BlenderbotConfig,
    BlenderbotForConditionalGeneration,
    BlenderbotTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# Special-token ids of facebook/blenderbot-400M-distill; <mask> comes after the vocab.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TOKEN_IDS: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Generation defaults of facebook/blenderbot-400M-distill.
BLENDERBOT_GENERATION = {
    "num_beams": 10,
    "min_length": 20,
    "max_length": 60,
    "length_penalty": 0.65,
    "no_repeat_ngram_size": 3,
    "encoder_no_repeat_ngram_size": 3,
    "forced_eos_token_id": 2,
    "decoder_start_token_id": 1,
    **TOKEN_IDS,
}

TINY_ARCHITECTURE = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 128,
}


def chitchat_messages() -> Iterator[str]:
    """Every message of every conversation in chitchat-dataset."""
    for conversation in chitchat_dataset.ConversationDataset():
        yield from conversation


# ChatML, as SmolLM2-Instruct and Qwen2.5-Instruct write it.
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "initializer_range": 0.5,  # wide enough that greedy decoding wanders over words
}


def _trained_bpe(
    vocab_size: int, special_tokens: list[str], prefix_space: bool
) -> ByteLevelBPETokenizer:
    bpe = ByteLevelBPETokenizer(add_prefix_space=prefix_space)
    bpe.train_from_iterator(
        chitchat_messages(),
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
    )
    return bpe


def train_tokenizer(vocab_size: int) -> BlenderbotTokenizer:
    """A Blenderbot tokenizer whose BPE vocabulary is learnt from chitchat messages."""
    bpe = _trained_bpe(vocab_size, SPECIAL_TOKENS, prefix_space=True)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return BlenderbotTokenizer(vocab=model["vocab"], merges=merges, model_max_length=128)


def build_model(
    vocab_size: int, architecture: dict[str, Any], seed: int = 0
) -> BlenderbotForConditionalGeneration:
    """A randomly initialised Blenderbot (weights from ``seed``) with real defaults."""
    torch.manual_seed(seed)
    config = BlenderbotConfig(
        vocab_size=vocab_size,
        scale_embedding=True,
        decoder_start_token_id=1,
        forced_eos_token_id=2,
        **TOKEN_IDS,
        **architecture,
    )
    model = BlenderbotForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**BLENDERBOT_GENERATION)
    return model


def build_tiny_checkpoint(out_dir: str | Path, vocab_size: int = 2000) -> Path:
    """Write a complete Hugging Face checkpoint directory and return its path."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(vocab_size)
    # Like the real model, <mask> (added last) lies outside the embedding matrix.
    model = build_model(len(tokenizer) - 1, TINY_ARCHITECTURE)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def train_chatml_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A ChatML tokenizer (GPT-2 style, no prefix space) learnt from chitchat messages."""
    bpe = _trained_bpe(vocab_size, CHATML_TOKENS, prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=TINY_DECODER["max_position_embeddings"],
    )


def build_tiny_chat_checkpoint(out_dir: str | Path, vocab_size: int = 2000, seed: int = 0) -> Path:
    """A decoder-only chat checkpoint directory (Llama + ChatML template)."""
    out = Path(out_dir)
    tokenizer = train_chatml_tokenizer(vocab_size)
    ids: dict[str, Any] = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("bos_token_id", "<|im_start|>"), ("eos_token_id", "<|im_end|>"),
            ("pad_token_id", "<|endoftext|>")]}  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **ids, **TINY_DECODER)).eval()
    # Random weights favour no token: keep the non-ending specials out of replies,
    # so the tiny model writes (random) words rather than invisible tokens.
    model.generation_config = GenerationConfig(
        **ids, max_new_tokens=48, do_sample=False,
        suppress_tokens=[ids["bos_token_id"], ids["pad_token_id"]],
    )  # fmt: skip
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


BUILDERS = {"encoder-decoder": build_tiny_checkpoint, "decoder-only": build_tiny_chat_checkpoint}
NAMES = {"encoder-decoder": "tiny-blenderbot", "decoder-only": "tiny-chat"}
"""Each family's directory name: a served model is named after its directory."""


def built_once(family: str, cache: Path) -> Path:
    """The tiny ``family`` checkpoint (``NAMES``), built under ``cache`` on first use.

    A build is deterministic (seeded weights, a tokenizer trained on fixed data), so
    every process of a test run, and every later run, can read one copy: a build took
    5-6 s, and ``make test``'s pytest processes each made both. The folder is named by
    this file and the versions of the libraries that write the checkpoint, so a change
    to either builds afresh (and the older build goes). One process builds, the others
    wait for it; a build is written whole or not at all."""
    versions = [importlib.metadata.version(p) for p in ("torch", "transformers", "tokenizers")]
    key = hashlib.sha256("\n".join([Path(__file__).read_text(), *versions]).encode())
    folder = cache / f"{family}-{key.hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            _build_into(folder, family)
    return folder / NAMES[family]


def _build_into(folder: Path, family: str) -> None:
    """``family``'s checkpoint in ``folder``, whole or not at all; its older builds gone."""
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        building.chmod(0o755)  # as a folder made otherwise (mkdtemp: for its owner only)
        BUILDERS[family](building / NAMES[family])
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for older in folder.parent.glob(f"{family}-*"):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=sorted(BUILDERS), default="encoder-decoder")
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()
    print(BUILDERS[args.family](args.out_dir, args.vocab_size))


if __name__ == "__main__":
    main()
