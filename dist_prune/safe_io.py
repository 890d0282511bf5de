"""Files on the user's disks, written so that nothing of the user's is written through and read so that no
user file can hang a run or fill its memory.

- Every file dist_prune writes (output, partial output, scratch) is created fresh beside its final name and
  renamed onto it (`replace_file`): a link standing at that name is replaced, never followed, and a kill
  leaves the old entry or the new file, never half of one.
- Every user file dist_prune parses itself (YAML and JSON files, safetensors headers) is read through
  `read_bounded`: a regular file only (a FIFO or /dev/zero would block or never end), at most a stated size.
- `check_room` compares the bytes a run will write with the free space before any work starts;
  `locked_dir` keeps two runs out of one output.
"""

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DistPruneError, KeptForResume

# The name a file is written under before it takes its own: hidden, unique to this write, never a name the
# user or another run could have chosen by accident; one left by a kill is recognised (`is_staged`) and removed.
_STAGED = re.compile(r"^\..+\.[0-9a-f]{16}\.staged$")


class CannotWrite(KeptForResume):
    """A write failed on the disk's side (full, read-only, over a quota or a size limit): the finished layers
    stay for --resume once there is room."""


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """`path` becomes a regular file of this run's making: `write(staged)` fills a sibling this call has just
    created (`new_staged`), which then takes `path`'s name by one rename."""
    staged = new_staged(path)
    try:
        with disk_errors(path):
            write(staged)
            os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def new_staged(path: Path) -> Path:
    """A new empty file beside `path`, under a hidden name of its own, made here (O_EXCL: never an existing
    file or a link), to be written and then renamed onto `path`."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.staged")
    with disk_errors(path):
        os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return staged


def write_text(path: Path, text: str) -> None:
    replace_file(path, lambda staged: staged.write_text(text))


def copy_file(source: Path, path: Path) -> None:
    replace_file(path, lambda staged: shutil.copy2(source, staged))


def is_staged(name: str) -> bool:
    return bool(_STAGED.match(name))


def is_regular(path: Path) -> bool:
    """A regular file itself, not a link to one."""
    return path.is_file() and not path.is_symlink()


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """An OSError of the disk (or safetensors' own error carrying one) as one line that names the file."""
    try:
        yield
    except OSError as err:
        raise CannotWrite(f"cannot write {path}: {err.strerror or err}") from None
    except Exception as err:  # safetensors' Rust writer reports an I/O error as "... (os error 28)"
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise CannotWrite(f"cannot write {path}: {os.strerror(int(code.group(1)))}") from None


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


def check_room(needs: dict[Path, int]) -> None:
    """Each folder's file system has room for the bytes the run will write there; folders on one file system
    share its room. A folder not made yet is measured at its nearest existing parent."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs.items():
        existing = _nearest_existing(folder)
        device = existing.stat().st_dev
        _, before = by_device.get(device, (existing, 0))
        by_device[device] = (existing, before + size)
    for place, size in by_device.values():
        free = shutil.disk_usage(place).free
        if size > free:
            raise DistPruneError(
                f"this run writes about {size / 2**30:.2f} GiB under {place} but its disk has "
                f"{free / 2**30:.2f} GiB free: make room, or pick another --out or --scratch"
            )


def check_writable(folder: Path, what: str) -> None:
    """`folder` is, or can be made as, a folder this process may write in."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise DistPruneError(f"the {what} {folder} cannot be made: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistPruneError(f"the {what} {folder} cannot be written: {existing} is read-only to this user")


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not os.path.lexists(folder):
        folder = folder.parent
    return folder


@contextmanager
def locked_dir(path: Path, busy: str) -> Iterator[None]:
    """Holds an exclusive lock on the folder `path` (made, with its parents, if missing) until the block ends:
    another process asking for it gets `busy` as its error. The lock is the kernel's (flock), so a killed
    holder releases it. The folders made here are removed at the end if they are still empty, so a refused
    run leaves nothing behind."""
    made = _make_dirs(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise DistPruneError(f"{path} cannot be used: {_why_not_a_folder(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistPruneError(busy) from None
        try:
            yield
        finally:  # still holding the lock: no other run can be inside the folder being removed
            for folder in [path, *reversed(made)]:
                _remove_if_empty(folder)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> list[Path]:
    """Makes `path` and any missing parents; returns those it made, outermost first."""
    missing = []
    folder = path.absolute()
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DistPruneError(f"{path} cannot be made: {_why_not_a_folder(err)}") from None
    return missing[::-1]


def _why_not_a_folder(err: OSError) -> str:
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
        return "it, or a folder above it, is a link or not a folder"
    return err.strerror or str(err)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
