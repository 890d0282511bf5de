"""User files read so that none can hang a run or fill its memory: every file dist_prune parses itself (YAML
and JSON files, safetensors headers) is read from a regular file only (a FIFO or /dev/zero would block or never
end), and at most a stated size of it; a loop of links is one line, not a traceback.
"""

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DistPruneError


@contextmanager
def open_regular(path: Path, what: str, error: type[DistPruneError]) -> Iterator[BinaryIO]:
    """A user's regular file, open for reading; anything else (missing, a FIFO, a device, a folder) raises
    `error` in one line. Opened without blocking, so a FIFO is refused rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{what} {path} cannot be read: not a regular file (a folder, a FIFO or a device)")
    with os.fdopen(fd, "rb") as f:
        try:
            yield f
        except OSError as err:
            raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None


def read_bounded(path: Path, limit: int, what: str, error: type[DistPruneError]) -> bytes:
    """The bytes of a user's regular file of at most `limit` bytes; anything else raises `error` in one line."""
    with open_regular(path, what, error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes: not one dist_prune can take")
    return data


# JSON files read here (config.json, a weight index, a manifest) are kilobytes; 64 MiB is far beyond any.
JSON_LIMIT = 64 * 2**20


def read_json(path: Path, what: str, error: type[DistPruneError], limit: int = JSON_LIMIT):
    """A user's JSON file, parsed; truncated, not UTF-8, too large or too deeply nested raises `error`."""
    return parse_json(read_bounded(path, limit, what, error), f"{what} {path}", error)


def parse_json(data: bytes, what: str, error: type[DistPruneError]):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to be read") from None


def resolved(path: Path) -> Path:
    """The absolute path with every link followed; a loop of links is one line, not a traceback."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 reports a loop as RuntimeError, 3.13 as OSError
        raise DistPruneError(f"{path} cannot be followed: {err}") from None
