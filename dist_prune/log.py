"""One logger for the package; messages carry the worker's rank once there is more than one worker."""

import logging
import sys

_LOGGER_NAME = "dist_prune"


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)


def setup_logging(quiet: bool = False, rank: int = 0, world_size: int = 1) -> None:
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    logger = get_logger()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
