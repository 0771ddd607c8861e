"""The run directory: which paths may become one, its lock, its identity and its signing key.

* ``--out`` must be a new path or an empty directory; a directory holding anything else (a user's own
  files, another run) is refused before anything is written.
* A run directory is held under an OS-level lock (``flock`` on ``RUN/.lock``, holder pid inside) for the
  lifetime of ``blur evolve`` / ``blur resume``. A second process is refused naming the holder; the kernel
  drops the lock when its holder dies, so a lock left by a killed process is simply taken over.
* ``run.json`` names the run (a random ``run_id``). Checkpoints carry it, so a checkpoint copied from
  another run is refused.
* Each run has a secret signing key kept *outside* the run directory, in the user's key store
  (``$BLUR_KEY_DIR``, default ``$XDG_DATA_HOME/blur-evolve/run-keys``, mode 0700, one 0600 file per run
  id). Strategy state that would be unpickled (pycma) is HMAC-signed with it, and ``blur resume`` refuses
  state whose signature is missing or wrong, so a run directory handed over by someone else never runs code.
* Run files are regular files inside the directory: a symlink among them is refused, appends never follow
  one, and atomic writes replace the link itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
from pathlib import Path

from evolution.checkpoint import CheckpointError, atomic_write_text
from evolution.config import ConfigError
from genome.io import atomic_write_bytes

LOCK_NAME = ".lock"
RUN_INFO_NAME = "run.json"
RUN_FORMAT = "blur-evolve-run-1"
RUN_FILES = ("config.yaml", RUN_INFO_NAME, "provenance.json", "checkpoint.ckpt", "metrics.jsonl", "best.genome",
             "report.json", "report.md")
RUN_MARKERS = ("checkpoint.ckpt", "metrics.jsonl", RUN_INFO_NAME)


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` held until :meth:`release` (or the process's death)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.previous_holder: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ConfigError(f"{self.path}: is a symlink; run files must be regular files") from None
            raise ConfigError(f"{self.path.parent}: cannot write there ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder else "another process"
                raise ConfigError(f"{self.path.parent}: in use by blur {who} (lock {self.path}); "
                                  "wait for it to finish or stop it") from None
            raise ConfigError(f"{self.path}: cannot lock ({error.strerror})") from None
        self.previous_holder = _read_pid(fd)  # a pid left here by a process that died holding the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding ``run_dir``'s lock (0 if unknown), or None when it is free; changes nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(fd) or 0
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def check_new_run_dir(out: Path) -> None:
    """Refuse an ``--out`` that is not a new path or an empty directory (nothing is written)."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out}: is a dangling symlink")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as error:
            raise ConfigError(f"--out {out}: cannot read ({error.strerror})") from None
        if any(name in entries for name in RUN_MARKERS):
            holder = lock_holder(out)
            if holder is not None:
                raise ConfigError(f"--out {out}: in use by blur process {holder} (a run is in progress there)")
            raise ConfigError(f"--out {out}: a run already exists there (use `blur resume {out}`)")
        if [name for name in entries if name != LOCK_NAME]:
            raise ConfigError(f"--out {out}: the directory is not empty and is not a blur run "
                              f"(holds {entries[0]!r}, ...); choose a new or empty directory")
    else:
        parent = next((p for p in out.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def create_run_dir(out: Path) -> RunLock:
    """Create (or take the empty) ``out`` and lock it; re-check under the lock that it is still empty."""
    check_new_run_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot create it ({error.strerror})") from None
    lock = RunLock(out).acquire()
    others = [p.name for p in out.iterdir() if p.name != LOCK_NAME]
    if others:  # another process got there between the check and the lock
        lock.release()
        raise ConfigError(f"--out {out}: a run already exists there (use `blur resume {out}`)")
    return lock


def open_run_dir(run_dir: Path) -> RunLock:
    """Lock an existing run directory for resuming; refuse symlinked run files; drop stale temporaries."""
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    if (run_dir / "config.yaml").is_symlink() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")  # refused before the lock is made
    lock = RunLock(run_dir).acquire()
    try:
        for name in RUN_FILES:
            if (run_dir / name).is_symlink():
                raise ConfigError(f"{run_dir / name}: is a symlink; run files must be regular files inside the "
                                  "run directory")
        for path in run_dir.glob(".*.tmp"):  # left by a process killed inside an atomic write
            if any(path.name.startswith(f".{name}.") for name in RUN_FILES) and not path.is_symlink():
                path.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


# ------------------------------------------------------------------------------------------ identity


def new_run_id() -> str:
    return secrets.token_hex(16)


def write_run_info(run_dir: Path, run_id: str) -> None:
    atomic_write_text(run_dir / RUN_INFO_NAME, json.dumps({"format": RUN_FORMAT, "run_id": run_id}, indent=2))


def read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_INFO_NAME
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        run_id = info["run_id"]
        if info.get("format") != RUN_FORMAT or not isinstance(run_id, str) or not run_id.isalnum():
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable run identity ({error})") from None
    return run_id


# ------------------------------------------------------------------------------------------ signing


def key_dir() -> Path:
    configured = os.environ.get("BLUR_KEY_DIR")
    if configured:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "blur-evolve" / "run-keys"


def create_run_key(run_id: str) -> bytes:
    directory = key_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    path = directory / f"{run_id}.key"
    atomic_write_bytes(path, key.hex().encode(), mode=0o600)  # never readable by others, not even briefly
    return key


def load_run_key(run_id: str) -> bytes | None:
    path = key_dir() / f"{run_id}.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None
