"""Atomic writes: a declared output either exists complete or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def chmod_default(path: str | Path, *, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) the mode the umask allows: mkstemp, mkdtemp and
    safetensors create them private (0600/0700), and results should read like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    chmod_default(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path):
    """Yield a temporary folder beside `path`; it replaces `path` (a folder, whatever it held) only if
    the block succeeds, so a reader sees the old folder or the new one whole, never a mix."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    chmod_default(tmp, directory=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: str | Path):
    """A JSON file a stage wrote; a missing or broken one is a one-line PasError naming it."""
    from pas.errors import PasError
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PasError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise PasError(f"{str(path)!r} is not valid JSON ({e})") from None
