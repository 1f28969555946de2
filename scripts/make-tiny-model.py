#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF model that llama.cpp loads in milliseconds.

    python scripts/make-tiny-model.py OUT.gguf

Random weights from a seeded generator, so the same gguf/numpy versions give identical bytes on
every run and the file's sha256 can be pinned (config/demo.toml pins the copy shipped in
config/models/). Architecture ``llama``: context 512, embedding 64, 2 blocks, feed-forward 128,
4 heads (4 KV heads), F32. Tokenizer ``llama`` (SentencePiece) with ``<unk> <s> </s>``, the 256
byte tokens (so any text tokenizes by byte fallback) and some single-character pieces.
It generates noise, quickly: a real model for real tests, never for real answers.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import gguf
import numpy as np

SEED = 20261203
CONTEXT = 512
EMBED = 64
BLOCKS = 2
FEED_FORWARD = 128
HEADS = 4
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

# gguf token types
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def vocabulary() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{value:02X}>" for value in range(256)]
    types += [BYTE] * 256
    pieces = ["\u2581"] + [
        ch for ch in string.ascii_letters + string.digits + ".,!?'-" if ch != "\u2581"
    ]
    pieces += ["\u2581" + ch for ch in string.ascii_lowercase[:10]]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(index) for index in range(len(pieces))]
    return tokens, types, scores


def write(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    tokens, types, scores = vocabulary()
    vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones(EMBED, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", weight(vocab, EMBED))
    for block in range(BLOCKS):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", ones())
        writer.add_tensor(prefix + "attn_q.weight", weight(EMBED, EMBED))
        writer.add_tensor(prefix + "attn_k.weight", weight(EMBED, EMBED))
        writer.add_tensor(prefix + "attn_v.weight", weight(EMBED, EMBED))
        writer.add_tensor(prefix + "attn_output.weight", weight(EMBED, EMBED))
        writer.add_tensor(prefix + "ffn_norm.weight", ones())
        writer.add_tensor(prefix + "ffn_gate.weight", weight(FEED_FORWARD, EMBED))
        writer.add_tensor(prefix + "ffn_up.weight", weight(FEED_FORWARD, EMBED))
        writer.add_tensor(prefix + "ffn_down.weight", weight(EMBED, FEED_FORWARD))
    writer.add_tensor("output_norm.weight", ones())
    writer.add_tensor("output.weight", weight(vocab, EMBED))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the .gguf file")
    args = parser.parse_args(argv)
    write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
