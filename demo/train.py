"""A few real training steps of a PiSSA adapter on the residual base, with the library only:
teach the tiny model one sentence, then save the trained adapter (what `convert --initial` takes).

usage: python demo/train.py RESIDUAL_BASE INITIAL_ADAPTER TRAINED_OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

SENTENCE = "the tiny llama merges the lora adapter"
STEPS = 40


def main(residual: Path, initial: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    from adapterctl import AdapterModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(residual))
    base = AutoModelForCausalLM.from_pretrained(str(residual))
    model = AdapterModel.from_pretrained(base, initial, is_trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    batch = tokenizer([SENTENCE], return_tensors="pt")
    model.train()
    for step in range(STEPS):
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, STEPS - 1):
            print(f"step {step + 1:2d}: loss {loss.item():.3f}")
    n = sum(p.numel() for p in trainable)
    print(f"trained {n:,} adapter parameters; saving to {out}")
    model.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
