"""A LoRA run of train.py's own `fine_tune` on 2 CPU ranks under ZeRO-3, with what users run on a GPU node
(bf16, activation checkpointing, the fused DFT loss), then a check that every frozen base weight is still the
base's: each is gathered from its shards and compared, bitwise, with the base on disk in the run's dtype.

Run by tests/modeling/test_lora_zero3.py under the DeepSpeed launcher:

    python -m deepspeed.launcher.runner --num_gpus 2 tests/modeling/lora_zero3_check.py --out DIR -- OVERRIDES...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from cluster.distributed import init_deepspeed_distributed
from tests.helpers import LORA_FROZEN_REPORT, fine_tune_in_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the DeepSpeed launcher
    parser.add_argument("overrides", nargs="*")
    cli = parser.parse_args()
    init_deepspeed_distributed()  # zero.Init reads the world size from deepspeed.comm, unset under use_cpu
    model = fine_tune_in_process([*cli.overrides, f"output_dir={cli.out}"]).model
    rank_zero = dist.get_rank() == 0
    base_path = model.peft_config["default"].base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_path).state_dict() if rank_zero else {}
    changed, checked, trainable = [], 0, []
    for name, parameter in model.get_base_model().named_parameters():
        if parameter.requires_grad:
            trainable.append(name)
            continue
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if rank_zero:
                expected = base[name.replace(".base_layer.", ".")].to(parameter.dtype)
                checked += 1
                if not torch.equal(parameter.detach().cpu(), expected):
                    changed.append(name)
    if rank_zero:
        dtypes = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
        report = {"checked": checked, "changed": changed, "trainable": trainable, "frozen_dtypes": dtypes}
        (cli.out / LORA_FROZEN_REPORT).write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
