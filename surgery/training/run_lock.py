"""One `surgery fit` at a time per run directory.

`<run_dir>/.fit.lock` holds the host, pid and start time of the process training there. A second fit into the
directory is refused at once while that process lives; a lock left by a process that died (killed, machine
rebooted) is taken over. The lock is released when the fit ends, however it ends short of SIGKILL.
Only the first process of a distributed run (rank 0 of node 0) takes it: the others train into the same directory.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
from pathlib import Path

from surgery.errors import SurgeryError

LOCK_NAME = ".fit.lock"
_held: dict[Path, bool] = {}  # lock path -> whether this process created its run directory


def _is_first_process() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # unreadable or half-written by a process that died: stale


def acquire(run_dir: str | Path) -> Path | None:
    """Take `<run_dir>/.fit.lock` for this process (creating run_dir), or raise SurgeryError naming the process
    that holds it. Returns the lock's path (None on processes of a distributed run other than the first)."""
    if not _is_first_process():
        return None
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(path)
                if owner is not None and owner["pid"] != me["pid"]:
                    where = "this machine" if owner.get("host") == me["host"] else f"host {owner.get('host')!r}"
                    if owner.get("host") != me["host"] or _alive(owner["pid"]):
                        gone = f"; if that process is gone, delete {path}" if owner.get("host") != me["host"] else ""
                        raise SurgeryError(
                            f"trainer.default_root_dir={str(run_dir)!r} is in use by another surgery fit (pid "
                            f"{owner['pid']} on {where}, since {owner.get('started', '?')}): wait for it to finish or "
                            f"stop it, or choose another trainer.default_root_dir{gone}"
                        ) from None
                path.unlink(missing_ok=True)  # its process died: take the directory over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            _held[path] = created
            return path
    except OSError as err:  # read-only, a file in the way, no space
        raise SurgeryError(
            f"trainer.default_root_dir={str(run_dir)!r} cannot be written ({err.strerror}: {err.filename}): "
            "choose a directory you can write to"
        ) from None
    raise SurgeryError(f"could not take {path}: other processes keep creating it; is another surgery fit starting there?")


def release_all() -> None:
    """Remove the locks this process holds (called when a fit ends, and at exit), and the run directories it
    created if a fit refused before writing anything left them empty."""
    for path, created in list(_held.items()):
        owner = _owner(path)
        if owner is not None and owner["pid"] == os.getpid():
            path.unlink(missing_ok=True)
            if created:
                try:
                    path.parent.rmdir()
                except OSError:
                    pass  # not empty: the run wrote something
        del _held[path]


atexit.register(release_all)
