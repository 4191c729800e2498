"""One run per workdir: a lock file that says who holds it, kept fresh while the run lives.

A second launch on a workdir in use would delete the first one's in-flight checkpoint (a new checkpoint
manager removes unfinished saves) and write into the same `metrics.jsonl`. The lock, `workdir/.lock`, holds
the holder's host, process id and start time; a thread touches it every `HEARTBEAT_S` seconds. Another process
that finds it refuses with one line naming the holder, unless the holder is gone: a process of this host that
no longer runs, or a lock untouched for `STALE_S` seconds (a killed or preempted machine), which it takes over
with a warning. Re-entrant within a process, so a notebook may build several runs on one workdir.
"""

import atexit
import json
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable

LOCK_NAME = ".lock"
HEARTBEAT_S = 20.0
STALE_S = 120.0

_held: dict[pathlib.Path, dict] = {}
_guard = threading.Lock()
_heartbeat: list[threading.Thread] = []


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def _describe(holder: dict, age: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"process {holder.get('pid')} on {holder.get('host')} since {started} (last seen {age:.0f} s ago)")


def _stale(holder: dict, age: float) -> bool:
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", -1)))
    return age > STALE_S


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _guard:
            for path in list(_held):
                try:
                    os.utime(path)
                except OSError:
                    pass


def acquire(workdir: str | pathlib.Path, warn: Callable[[str], None]) -> pathlib.Path:
    """Takes the workdir's lock for this process (creating the workdir), or raises RuntimeError in one line."""
    workdir = pathlib.Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} is a file, not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    path = workdir / LOCK_NAME
    record = {**_me(), "started": time.time()}
    with _guard:
        if path in _held:
            return path
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except (FileNotFoundError, PermissionError) as e:
                raise OSError(f"cannot write to workdir {workdir}: {e.strerror}") from None
            except FileExistsError:
                try:
                    holder, age = json.loads(path.read_text() or "{}"), time.time() - path.stat().st_mtime
                except (OSError, ValueError):
                    holder, age = {}, STALE_S + 1  # torn by a kill in the middle of writing it
                if holder.get("host") == record["host"] and holder.get("pid") == record["pid"]:
                    break  # ours, from a Run of this process that was closed without releasing
                if not _stale(holder, age):
                    raise RuntimeError(f"workdir {workdir} is in use by {_describe(holder, age)}; wait for that "
                                       f"run to end, or delete {path} if it is gone") from None
                warn(f"taking over the lock of {workdir} from {_describe(holder, age)}, which is gone")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            break
        else:
            raise RuntimeError(f"could not take the lock {path}: another process keeps taking it")
        _held[path] = record
        if not _heartbeat:
            _heartbeat.append(threading.Thread(target=_beat, name="workdir-lock-heartbeat", daemon=True))
            _heartbeat[0].start()
    return path


def release(path: pathlib.Path) -> None:
    """Gives the lock back (if this process holds it)."""
    with _guard:
        if _held.pop(path, None) is not None:
            path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release(path)
