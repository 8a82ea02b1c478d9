"""Atomic file output: a crash or an error never leaves a half-written file where a result is expected."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils.errors import InputError

FILE_MODE = 0o644  # mkstemp creates 0600; results are meant to be shared


def ensure_folder(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) if needed; a folder that cannot be made is the user's choice of output
    location, so it ends in an InputError that says so, not in a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {folder}: {exc.strerror or exc}; choose another output "
                         "location") from None
    return folder


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``, else it is removed."""
    path = Path(path)
    ensure_folder(path.parent)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}; choose another output location") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_output_file(path: str | os.PathLike[str], overwrite: bool = False, flag: str = "--output") -> Path:
    """Refuse an existing ``path`` (unless ``overwrite``) or one whose folder cannot be created or written (checked on
    its nearest existing ancestor; nothing is created here)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it or choose another {flag}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # created only when a result is written
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {folder} is {'not a folder' if not folder.is_dir() else 'read-only'}"
                         f"; choose another {flag}")
    return path
