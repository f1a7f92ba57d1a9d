"""Benchmarks: dist_train against minimal hand-written loops on the same models, data and optimizer.

`python -m bench` (or `make bench`) runs the reference workloads through dist_train and through the
hand-written torchrun loops in this package, alternating A B A B, at world sizes 1 and 2, and prints
step time, samples/s, time to first step, peak RSS and the dist_train / hand-written ratios.
`python -m bench.gpu` is the single-GPU GPT-2-small run (bf16, torch.compile, SDPA) with tokens/s and MFU.
"""
