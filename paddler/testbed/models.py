"""Random-weight GGUF models that llama-server loads, written with the gguf package.

Deterministic from a seed. The vocabulary is printable ASCII (plus space, tab
and newline) and merges of it, so whatever random weights generate decodes as
valid UTF-8, and the tokenizer drops any other byte of a prompt instead of
failing. llama.cpp requires a non-empty merges list for a gpt2 tokenizer.

    python -m paddler.testbed.models tiny /tmp/tiny.gguf
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    embedding: int
    layers: int
    heads: int
    feed_forward: int
    vocab: int
    context: int


SHAPES = {
    # ~0.2M parameters: loads in milliseconds, thousands of tokens per second.
    "tiny": ModelShape(embedding=64, layers=2, heads=4, feed_forward=128, vocab=512, context=4096),
    # ~28M parameters: prefill and decode costs like a small real model, for benchmarks.
    "bench": ModelShape(
        embedding=512, layers=8, heads=8, feed_forward=1408, vocab=2048, context=8192
    ),
}


def _gpt2_byte_symbol(byte: int) -> str:
    """GPT-2's printable stand-in for a byte (space is 'Ġ', newline 'Ċ')."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    if byte in printable:
        return chr(byte)
    shift = sum(1 for b in range(byte) if b not in printable)
    return chr(256 + shift)


def vocabulary(size: int) -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and token types: special tokens, bytes, then merged pairs."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [_gpt2_byte_symbol(b) for b in [9, 10, *range(32, 127)]]
    tokens = specials + byte_tokens
    merges: list[str] = []
    known = set(tokens)
    letters = [t for t in byte_tokens if t.isalnum()] + [_gpt2_byte_symbol(32)]
    # Pairs in a fixed order: deterministic without a random generator.
    for first in letters:
        for second in letters:
            if len(tokens) >= size:
                break
            merged = first + second
            if merged not in known:
                tokens.append(merged)
                merges.append(f"{first} {second}")
                known.add(merged)
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(specials)
    )
    return tokens, merges, [int(t) for t in types]


def write_model(path: Path, shape: ModelShape | str = "tiny", seed: int = 0) -> Path:
    if isinstance(shape, str):
        shape = SHAPES[shape]
    tokens, merges, types = vocabulary(shape.vocab)
    rng = np.random.default_rng(seed)
    head_dim = shape.embedding // shape.heads

    def weights(*dims: int) -> Any:
        scale = 1.0 / float(np.sqrt(dims[-1]))
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(f"paddler-testbed-{shape.embedding}x{shape.layers}-seed{seed}")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    norm = np.ones(shape.embedding, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(len(tokens), shape.embedding))
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("output.weight", weights(len(tokens), shape.embedding))
    for layer in range(shape.layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weights(shape.embedding, shape.embedding))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm)
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(shape.feed_forward, shape.embedding))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(shape.feed_forward, shape.embedding))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(shape.embedding, shape.feed_forward))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight GGUF model.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_model(args.path, args.shape, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
