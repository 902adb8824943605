"""One training process group per run folder: an exclusive lock on `<out_dir>/.llmstack.lock`.

`flock` locks belong to the open file: the kernel releases them when the holder exits, however it
exits (SIGKILL included), so a lock is never stale after its holder's death and needs no cleanup.
The file is never written (so a refused run changes no byte of the folder); the holder's pid is
read from /proc/locks to name it in the refusal.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from llmstack.errors import UserError

LOCK_NAME = ".llmstack.lock"


class RunFolderBusy(UserError):
    pass


def _holder(inode: int) -> str:
    """'llmstack train pid N (cmdline...)' for the process holding the lock on `inode`, if visible."""
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            # 1: FLOCK  ADVISORY  WRITE 12345 fd:01:67890 0 EOF
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                pid = parts[4]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} ({cmd[:120]})" if cmd else f"pid {pid}"
    except (OSError, IndexError):
        pass
    return "another llmstack train"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.fstat(fd).st_ino)
            os.close(fd)
            raise RunFolderBusy(f"out_dir: {self.path.parent} is in use by {holder}; wait for it to finish "
                                "or choose another out_dir") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
