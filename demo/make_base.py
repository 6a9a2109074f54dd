"""Write the demo's base model: a tiny random Llama (hidden 64, 2 layers) with a word-level
tokenizer, built from a config (nothing is downloaded). Its shapes fit the example checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    words = [
        "the",
        "a",
        "adapter",
        "base",
        "model",
        "merges",
        "loads",
        "tiny",
        "random",
        "llama",
        "lora",
        "rank",
        "alpha",
        "scale",
    ]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": len(vocab) + i for i in range(128 - len(vocab) - 1)})
    vocab["[UNK]"] = len(vocab)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=len(vocab) - 1,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fast.save_pretrained(str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
