"""An output directory written by one process at a time and put in place atomically: the mechanism under
`runtime.checkpoint.CheckpointWriter`, kept apart from the checkpoint format (the design is in that module's
docstring).

- `acquire_lock` / `release_lock`: `.<name>.lock` beside the target, flock(2)-ed (O_CREAT|O_EXCL with a dead-PID
  takeover where fcntl is missing), holding the holder's PID for the message.
- `renameat2(src, dst, RENAME_NOREPLACE | RENAME_EXCHANGE)`: Linux's atomic no-replace / swap renames; False where
  the C library, kernel or file system lacks them (the caller then checks and renames).
- `register_writer` / `unregister_writer`: open writers (objects with `abort()`) are aborted on SIGTERM / SIGHUP and at
  interpreter exit; `signals_deferred()` holds such a signal back while a swap is in progress.
- `remove_stale`: `.<name>.tmp-<pid>` / `.<name>.old-<pid>` directories of dead PIDs beside the target.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import functools
import os
import re
import shutil
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import BrownoutError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def nearest_existing(path: Path) -> Path:
    """The nearest existing ancestor of `path` (a file when lstat says ENOTDIR)."""
    for p in path.parents:
        if os.path.lexists(p):
            return p
    return path


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) sends CTRL_C_EVENT there: never call it, never take a PID for dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` / `.<name>.old-<pid>` directories beside `out` whose writer (PID) is dead."""
    target = Path(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for n in sorted(names):
        m = pattern.fullmatch(n)
        p = target.parent / n
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if stat.S_ISDIR(os.lstat(p).st_mode):  # ours are always directories; leave anything else alone
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# -- the lock ---------------------------------------------------------------------------------------------------------
def busy_message(out, holder: str | None) -> str:
    who = f"pid {holder}" if holder else "another process"
    return f"another build ({who}) is writing {out}; wait for it to finish or choose another path"


def acquire_lock(path: Path, out) -> int:
    """The open, flock-ed lock file (PID inside). Raises BrownoutError when a live writer holds it."""
    if fcntl is None:
        return _acquire_exclusive_file(path, out)
    for _ in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise BrownoutError(busy_message(out, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed it while we opened it: lock the one now at the path
    raise BrownoutError(busy_message(out, None))


def _acquire_exclusive_file(path: Path, out) -> int:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip())
            except (OSError, ValueError):
                raise BrownoutError(busy_message(out, None)) from None
            if pid_alive(holder):
                raise BrownoutError(busy_message(out, str(holder))) from None
            path.unlink(missing_ok=True)  # its writer is dead
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise BrownoutError(busy_message(out, None))


def release_lock(path: Path, fd: int) -> None:
    if fcntl is None:  # Windows removes no open file
        os.close(fd)
        path.unlink(missing_ok=True)
        return
    try:
        os.unlink(path)  # while still locked: see the module docstring
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# -- atomic placement -------------------------------------------------------------------------------------------------
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=None)
def _renameat2_fn():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False where the C library, kernel or file system lacks it (the caller falls back)."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


# -- signals: open writers clean up on SIGTERM / SIGHUP ---------------------------------------------------------------
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_open_writers: list = []  # objects with abort(): the open writers of this process
_previous_handlers: dict[int, object] = {}
_deferred_signals: list[int] = []
_placing = [0]  # > 0 while a commit swaps directories: a signal then waits until the swap is done


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def register_writer(writer) -> None:
    _open_writers.append(writer)
    if _previous_handlers or not _in_main_thread():
        return
    for s in _SIGNALS:
        prev = signal.getsignal(s)
        if prev is not signal.SIG_IGN:  # an ignored signal stays ignored
            _previous_handlers[s] = prev
            signal.signal(s, _on_signal)


def unregister_writer(writer) -> None:
    if writer in _open_writers:
        _open_writers.remove(writer)
    if not _open_writers and _previous_handlers and _in_main_thread():
        for s, prev in _previous_handlers.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)  # None: set outside Python
        _previous_handlers.clear()


def _on_signal(signum, frame) -> None:
    if _placing[0]:
        _deferred_signals.append(signum)
        return
    prev = _previous_handlers.get(signum, signal.SIG_DFL)
    for w in list(_open_writers):
        w.abort()
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # die of it, as without us


@contextmanager
def signals_deferred():
    _placing[0] += 1
    try:
        yield
    finally:
        _placing[0] -= 1


def deliver_deferred() -> None:
    while _deferred_signals and not _placing[0]:
        signal.raise_signal(_deferred_signals.pop(0))


@atexit.register
def _abort_open_writers() -> None:
    for w in list(_open_writers):
        w.abort()
