"""File access that never follows a symbolic link, and atomic writes built on it.

The job store and the pipeline write into folders that a client's job owns. A link planted there
(``out/`` pointing elsewhere, ``report.json.tmp`` pointing at a file outside) must never make the
server read or overwrite what lies outside. So: in the job store every path component below a
trusted folder is opened with ``O_NOFOLLOW`` (``open_dir``/``open_file``, ``strict=True``: a link
is an error, never followed); everywhere, temporary files get unpredictable names and are created
exclusively (``O_EXCL``: a planted file or link is refused, not written through), a file is read
only if it is not a link itself, and the final ``rename`` replaces a link at the target rather
than writing into where it points. (The worker refuses to run a job whose ``out/`` or
``checkpoints/`` is a link, so the pipeline's own writes stay inside the job.)

Atomic writes: temporary file in the same folder, fsync, ``os.replace``, fsync of the folder, so
a crash leaves the old or the new file, never a torn one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
Chunks = bytes | memoryview | Iterable[bytes | memoryview]


class LinkRefused(OSError):
    """A path component is a symbolic link (or not the kind of file expected)."""


def open_dir(folder: str | os.PathLike, *parts: str) -> int:
    """A file descriptor of ``folder/parts...``; no component (``folder`` included) may be a link."""
    try:
        fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        raise _refusal(exc, Path(folder)) from None
    for i, part in enumerate(parts):
        try:
            sub = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise _refusal(exc, Path(folder, *parts[: i + 1])) from None
        finally:
            os.close(fd)
        fd = sub
    return fd


def open_file(folder: str | os.PathLike, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A file descriptor of ``folder/rel`` opened without following a link in any component."""
    *dirs, name = Path(rel).parts
    dfd = open_dir(folder, *dirs)
    try:
        return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dfd)
    except OSError as exc:
        raise _refusal(exc, Path(folder, rel)) from None
    finally:
        os.close(dfd)


def read_bytes(folder: str | os.PathLike, rel: str) -> bytes:
    """The content of regular file ``folder/rel``; a link anywhere on the way is refused."""
    with os.fdopen(open_file(folder, rel), "rb") as fh:
        if not _is_regular(fh.fileno()):
            raise LinkRefused(f"{Path(folder, rel)} is not a regular file")
        return fh.read()


def open_read(path: str | os.PathLike, strict: bool = False) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, not a link (``strict``: its folder must not be one either)."""
    path = Path(path)
    dfd = _parent_fd(path, strict)
    try:
        fd = os.open(path.name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        raise _refusal(exc, path) from None
    finally:
        os.close(dfd)
    fh = os.fdopen(fd, "rb")
    if not _is_regular(fh.fileno()):
        fh.close()
        raise LinkRefused(f"{path} is not a regular file")
    return fh


def atomic_write(path: str | os.PathLike, data: Chunks | Callable[[BinaryIO], None], strict: bool = False) -> None:
    """Write ``path`` atomically: readers see the old or the new content; no link at the file's name is written through.

    ``data`` is bytes, a list of byte chunks, or a function that writes into the open file. With
    ``strict`` the folder must not be a link either (the job store; a user's own output folder may be one).
    """
    path = Path(path)
    dfd = _parent_fd(path, strict)
    tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                if callable(data):
                    data(fh)
                else:
                    for chunk in [data] if isinstance(data, (bytes, memoryview)) else data:
                        fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dfd)
        except OSError:
            pass
    finally:
        os.close(dfd)


def make_dirs(folder: str | os.PathLike, *parts: str) -> None:
    """Create ``folder/parts...`` as real folders (existing ones must not be links)."""
    for i in range(len(parts)):
        dfd = open_dir(folder, *parts[:i])
        try:
            os.mkdir(parts[i], 0o755, dir_fd=dfd)
        except FileExistsError:
            pass
        finally:
            os.close(dfd)
    os.close(open_dir(folder, *parts))


def is_link_free(folder: str | os.PathLike, *parts: str) -> bool:
    """Whether ``folder/parts...`` is a real folder reached without any link."""
    try:
        os.close(open_dir(folder, *parts))
        return True
    except OSError:
        return False


def _parent_fd(path: Path, strict: bool) -> int:
    if strict:
        return open_dir(path.parent)
    try:
        return os.open(path.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise _refusal(exc, path.parent) from None


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def _refusal(exc: OSError, path: Path) -> OSError:
    # ELOOP (a link with O_NOFOLLOW) and ENOTDIR (a link to a file where a folder was expected) say the same.
    import errno

    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return LinkRefused(exc.errno, f"{path} is a symbolic link or not a folder; links are not followed here")
    return exc
