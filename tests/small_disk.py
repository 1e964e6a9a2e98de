"""A disk that fills up part-way through a write, for the short-write tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class SmallDisk:
    """Room for ``room`` more bytes in files under ``directory``: a write that does not
    fit writes what fits and returns the count (as write(2) does when a disk fills, a
    quota or a file-size limit is reached); the next write fails with ``error``."""

    def __init__(self, monkeypatch: Any, directory: Path, room: int, error: int):
        self.directory, self.room, self.error = str(directory), room, error
        self._write, self._writev = os.write, os.writev
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "writev", self.writev)

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.directory)
        except OSError:
            return False

    def write(self, fd: int, data) -> int:
        if not self._ours(fd):
            return self._write(fd, data)
        if self.room <= 0:
            raise OSError(self.error, os.strerror(self.error))
        count = self._write(fd, bytes(data)[: self.room])
        self.room -= count
        return count

    def writev(self, fd: int, buffers) -> int:
        if not self._ours(fd):
            return self._writev(fd, buffers)
        return self.write(fd, b"".join(buffers))
