"""Operator tools behind `dist-train check`, `dist-train doctor` and `dist-train verify`.

check.py    validate a config without a process group and print what the run will do
pitfalls.py the warnings `check` gives (BatchNorm, fp16 on CPU, dropped tail, foreign checkpoint, disk)
memory.py   parameter count, per-rank model-state memory per strategy, activation estimate
doctor.py   versions, devices, launcher environment, disk, all-reduce bandwidth across ranks
verify.py   the framework's parity and resume guarantees, on the user's own model and data
report.py   small text-table and byte formatting helpers shared by the three
"""
