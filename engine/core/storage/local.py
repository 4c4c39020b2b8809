"""The local-disk store: atomic writes by rename, compare-and-swap under a file lock."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import ConflictError, IntegrityError, NotFoundError
from engine.core.storage.base import CHUNK, ObjectInfo, Store, Versioned, check_key, sha256_bytes, sha256_file

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


class LocalStore(Store):
    """A directory on local disk (the embedded default)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path:
        """The file that holds ``key`` (read it in place instead of copying it)."""
        return self._path(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def upload_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256 or sha256_file(path)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            # Verify the copy before it becomes visible under its key.
            got = sha256_file(tmp)
            if got != expected:
                raise IntegrityError(f"copy of {os.fspath(path)!r} to {self.describe(key)} has sha256 {got[:12]}, "
                                     f"expected {expected[:12]}; the source changed or the disk is failing")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return expected

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.describe(key)} does not exist")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [check_key(prefix)]
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".lock")):
                    continue  # in-flight temp files and lock files are not objects
                out.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(out)

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:  # `list` is a method here
        out = []
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted between list and stat
                st = self._path(key).stat()
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return out

    def iter_bytes(self, key: str, block_size: int = CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the `with f:` below, after the not-found check
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFoundError(f"{self.describe(key)} does not exist") from err
        with f:
            yield from iter(lambda: f.read(block_size), b"")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(prefix)
        # Local disk keeps directories: drop the now-empty ones (and their lock files) so a
        # deleted prefix is gone, as it is on S3.
        base = self._path(prefix)
        if base.is_dir():
            for dirpath, _dirs, files in os.walk(base, topdown=False):
                if all(name.startswith(".") and name.endswith(".lock") for name in files):
                    for name in files:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(dirpath, name))
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        return n

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        with open(lock, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get_versioned(self, key: str) -> Versioned | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, sha256_bytes(data))

    def put_if_absent(self, key: str, data: bytes) -> str:
        with self._locked(key) as path:
            if path.exists():
                raise ConflictError(f"{self.describe(key)} already exists")
            self.write_bytes(key, data)
        return sha256_bytes(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        with self._locked(key) as path:
            try:
                current = sha256_bytes(path.read_bytes())
            except FileNotFoundError as err:
                raise ConflictError(f"{self.describe(key)} was deleted concurrently") from err
            if current != etag:
                raise ConflictError(f"{self.describe(key)} changed concurrently (etag {etag[:12]} is stale)")
            self.write_bytes(key, data)
        return sha256_bytes(data)

    def delete_if_match(self, key: str, etag: str) -> None:
        with self._locked(key) as path:
            try:
                current = sha256_bytes(path.read_bytes())
            except FileNotFoundError:
                return
            if current != etag:
                raise ConflictError(f"{self.describe(key)} changed concurrently (etag {etag[:12]} is stale)")
            path.unlink()

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem()

    def arrow_path(self, key: str) -> str:
        return str(self._path(key)) if key else str(self.root)
