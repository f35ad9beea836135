"""The recipe a user runs on a GPU node, on every model family, on 2 CPU ranks: ZeRO-3, activation checkpointing,
bf16 and the fused DFT loss, through train.py's own `fine_tune` (data -> model -> train -> save -> verified export).

Run by tests/modeling/test_family_matrix.py under the DeepSpeed launcher:

    python -m deepspeed.launcher.runner --num_gpus 2 tests/modeling/family_matrix_check.py --out DIR \
        --model-cache .cache/models llama3 qwen2 ...

One process group serves every family (a launch costs more than the training here); each family's run writes
its metrics.jsonl and saved model under DIR/<family>. The test compares them with a one-process fp32 reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from cluster.distributed import init_deepspeed_distributed
from tests.helpers import family_matrix_overrides, fine_tune_in_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-cache", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the DeepSpeed launcher
    parser.add_argument("families", nargs="+")
    cli = parser.parse_args()
    init_deepspeed_distributed()  # zero.Init reads the world size from deepspeed.comm, unset under use_cpu
    for family in cli.families:
        fine_tune_in_process(family_matrix_overrides(family, cli.model_cache, cli.out / family, distributed=True))
        unset_hf_deepspeed_config()
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
