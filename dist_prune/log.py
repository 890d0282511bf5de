"""One logger for the package; messages carry the worker's rank once there is more than one worker."""

import json
import logging
import sys

_LOGGER_NAME = "dist_prune"


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)


class _JsonFormatter(logging.Formatter):
    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def format(self, record: logging.LogRecord) -> str:
        entry = {"event": "log", "level": record.levelname.lower(), "message": record.getMessage()}
        if self.world_size > 1:
            entry["rank"] = self.rank
        return json.dumps(entry)


def setup_logging(quiet: bool = False, rank: int = 0, world_size: int = 1, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter(rank, world_size))
    else:
        prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    logger = get_logger()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
