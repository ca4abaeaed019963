"""Artifact folders: staged in a temporary sibling folder, published whole by rename, or not at all.

An artifact folder holds the files a production service loads plus `manifest.json`, which
describes them (hashes, I/O, parity, accuracy, toolchain, machine). Readers can rely on the
folder being complete: it only ever appears at its final path through `os.replace`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import signal
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enginekit.core.errors import InputError
from enginekit.core.tensors import TensorSpec

MANIFEST_SCHEMA = "enginekit.manifest/1"
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write one file so readers see the old content or the complete new one: `write` fills a
    temporary file beside `path`, which is fsynced and renamed over it (removed on failure)."""
    atomic_write_all([(path, write)])


def atomic_write_all(items: list[tuple[str | Path, Callable[[Path], None]]]) -> None:
    """Write several files all or none: every temporary file is filled and fsynced first (a full
    disk fails here, leaving nothing), then each is renamed into place."""
    from enginekit.core.outputs import resolved

    staged = []
    try:
        for path, write in items:
            path = resolved(path)  # a link is followed, never replaced by a file
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_leftovers(path.parent, ".tmp", f".{path.name}")
            tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix, which some writers check
            staged.append((tmp, path))
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextmanager
def staged_artifact(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `final` whole, on error it vanishes.

    The staging folder is a sibling of `final` so the publishing rename never crosses file systems.
    An existing artifact at `final` stays intact until the new one is complete.
    """
    from enginekit.core.outputs import ARTIFACT, Output, check_outputs, resolved

    final = resolved(final)  # a link is followed: the artifact lands where it points, judged as that folder
    check_outputs([Output(final, ARTIFACT)])  # never replace a folder enginekit did not write
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(final.parent, f".{final.name}.staging-")
    remove_stale_leftovers(final.parent, f".{final.name}.retired-")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{os.getpid()}-", dir=final.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; artifacts get the usual permissions
    try:
        yield staging
        _fsync_tree(staging)
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_leftovers(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove what a killed enginekit process left in `folder` (staging folders, retired
    artifacts, temporary files): only names enginekit makes (`prefix<pid>...suffix`), and only
    when that process is gone."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or not name.endswith(suffix):
            continue
        pid = name[len(prefix):].split("-", 1)[0].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def scratch_dir(kind: str) -> "tempfile.TemporaryDirectory[str]":
    """A temporary folder named for this process (`enginekit-<kind>-<pid>-...`), after removing
    the ones killed processes left behind."""
    remove_stale_leftovers(Path(tempfile.gettempdir()), f"enginekit-{kind}-")
    return tempfile.TemporaryDirectory(prefix=f"enginekit-{kind}-{os.getpid()}-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(staging: Path, final: Path) -> None:
    """Put `staging` at `final` so that `final` always holds a complete artifact: a plain rename
    when nothing is there, else an atomic exchange (renameat2 RENAME_EXCHANGE) with the old one,
    which is then removed. SIGINT/SIGTERM are held back for the few system calls this takes."""
    with _signals_deferred():
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
            if not _exchange(staging, final):
                _replace_in_two_steps(staging, final)
        fsync_dir(final.parent)
    if staging.exists():  # the exchange left the previous artifact here
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15); False where the system cannot."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _replace_in_two_steps(staging: Path, final: Path) -> None:
    retired = final.parent / f".{final.name}.retired-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(final, retired)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(retired, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM (delivered right after) where the platform allows it."""
    signals = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Manifest(dict):
    """An artifact's manifest: the JSON document of schema `enginekit.manifest/1` (a dict, so it
    serialises as is and old code reading keys keeps working), with typed accessors."""

    @property
    def model(self) -> str:
        return self.get("model", "")

    @property
    def target(self) -> str:
        return self.get("target", "")

    @property
    def precision(self) -> str:
        return self.get("precision", "")

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(entry) for entry in self.get("inputs", [])]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(entry) for entry in self.get("outputs", [])]

    @property
    def accuracy(self) -> dict[str, Any]:
        return self.get("accuracy", {})

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.get("files", [])


def file_entries(folder: Path) -> list[dict[str, Any]]:
    """List every file in an artifact folder (except the manifest) with its size and sha256."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST_NAME):
        entries.append({"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Manifest:
    """Fill in `schema` and `files`, then write `manifest.json` into an artifact folder."""
    full = Manifest({"schema": MANIFEST_SCHEMA, **manifest, "files": file_entries(folder)})
    (folder / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def read_manifest(folder: str | Path) -> Manifest:
    from enginekit.core.loaders import load_json_document

    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(f"not an enginekit artifact (no {MANIFEST_NAME})", folder)
    return Manifest(load_json_document(folder / MANIFEST_NAME, MANIFEST_SCHEMA, "manifest"))


def verify_files(folder: str | Path, manifest: dict[str, Any]) -> None:
    """The manifest's file list is the artifact exactly: every entry a relative path inside the
    folder to a regular file with the recorded hash, and no file in the folder left unlisted.
    Anything else (tampering, a lost field, a link out of the folder) makes the artifact unusable."""
    from pathlib import PurePosixPath

    folder = Path(folder)
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise InputError("manifest lists no files", folder)
    listed = set()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
            raise InputError("manifest has a file entry without a path or sha256", folder)
        relative = PurePosixPath(entry["path"])
        if relative.is_absolute() or not relative.parts or ".." in relative.parts or "\\" in entry["path"] or relative.as_posix() == MANIFEST_NAME:
            raise InputError(f"manifest lists '{entry['path']}', which is not a file inside the artifact", folder)
        path = folder / relative
        if path.is_symlink() or any(parent.is_symlink() for parent in path.parents if parent != folder and folder in parent.parents):
            raise InputError(f"artifact file '{entry['path']}' is a symbolic link; refused", folder)
        if not path.is_file():
            raise InputError(f"artifact file '{entry['path']}' is missing", folder)
        if sha256_file(path) != entry["sha256"]:
            raise InputError(f"artifact file '{entry['path']}' does not match its manifest hash", folder)
        listed.add(relative.as_posix())
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}
    unlisted = sorted(present - listed - {MANIFEST_NAME})
    if unlisted:
        raise InputError(f"artifact holds file(s) its manifest does not list ({', '.join(unlisted[:3])})", folder)
