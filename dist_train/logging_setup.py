"""Rank-aware logging: rank 0 logs info, other ranks warnings and errors, each line prefixed with its rank."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "dist_train"


def setup_logging(rank: int, world_size: int) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger
