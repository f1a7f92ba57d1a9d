"""`python -m userpkg.ds_fp16 ARGS`: dist_train with DeepSpeed's CPU accelerator claiming fp16 support,
so a CPU test runs DeepSpeed's own fp16 path (model cast, loss scaler), the one it takes on CUDA."""

import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

from dist_train.cli import main

CPU_Accelerator.is_fp16_supported = lambda self: True

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
