"""Build a small, randomly initialised Blenderbot that works with no internet.

Tests, benchmarks and the offline demo need a real checkpoint directory without
downloading one. This builds it from parts the project owns: a byte-level BPE
tokenizer trained on the MIT-licensed ``chitchat-dataset`` conversations (7,168 real
chats shipped on PyPI) and the Blenderbot architecture at small sizes, with the real
model's special-token ids and generation defaults.

    python -m chatbot.tiny_model OUT_DIR [--vocab-size 2000]
"""

from __future__ import annotations

import argparse
import json
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
)

# Special-token ids of facebook/blenderbot-400M-distill; <mask> comes after the vocab.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

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


def train_tokenizer(vocab_size: int) -> BlenderbotTokenizer:
    """A Blenderbot tokenizer whose BPE vocabulary is learnt from chitchat messages."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(
        chitchat_messages(),
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return BlenderbotTokenizer(
        vocab=model["vocab"], merges=merges, model_max_length=128
    )


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()
    print(build_tiny_checkpoint(args.out_dir, args.vocab_size))


if __name__ == "__main__":
    main()
