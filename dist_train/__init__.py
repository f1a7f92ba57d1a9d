"""dist_train: one command from one CPU process to thousands of GPUs, with exact resume."""

__version__ = "0.1.0"
