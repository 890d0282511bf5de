"""Run under torchrun (2 ranks, CPU, gloo): train a tiny LLaMA for two steps with DeepSpeed ZeRO in bf16 and
save it as DeepSpeed does, with config.json and the tokenizer beside `latest` as trainers leave them.

    torchrun --nproc-per-node 2 tests/zero_training.py STAGE HF_INIT_DIR OUT_DIR
"""

import importlib
import shutil
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM

HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(stage: int, init: Path, out: Path) -> None:
    # DeepSpeed JIT-compiles a shared-memory op for CPU collectives (a minute of g++ on a fresh machine); gloo,
    # which it falls back to without it, gives the same checkpoint.
    # `deepspeed.comm.torch` as an attribute is the torch package (re-exported): patch the module itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    settings = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "bf16": {"enabled": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=settings)
    generator = torch.Generator().manual_seed(engine.global_rank)
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(out))
    if engine.global_rank == 0:
        for name in HF_FILES:
            if (init / name).is_file():
                shutil.copy2(init / name, out / name)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
