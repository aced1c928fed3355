"""Start, watch and stop control-plane processes; each runs in its own process group and logs to a file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """A component failed to start or become ready; the message carries the tail of its log."""


def free_ports(n: int) -> list[int]:
    """Pick ``n`` distinct free loopback ports.

    NOTE: the sockets are held until all are picked so the ports are distinct, but another process may still grab one
    before the component binds it; the caller retries the whole start when a bind fails.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (or a note that it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process is SIGKILLed, the kernel SIGTERMs the component.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """One running component."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pid: int = 0

    def start(self, detached: bool) -> None:
        """Spawn in a new session (own process group). ``detached`` ones must outlive this Python process."""
        # PDEATHSIG fires when the spawning *thread* exits, so it is only safe from the main thread.
        tie = not detached and threading.current_thread() is threading.main_thread()
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env, start_new_session=True,
                                          preexec_fn=_die_with_parent if tie else None)
        self.pid = self.popen.pid

    def exited(self) -> int | None:
        """Exit code if the process is gone, else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if pid_alive(self.pid) else -1

    def failure(self, why: str) -> ClusterError:
        return ClusterError(f"{self.name}: {why}\n--- last lines of {self.log} ---\n{log_tail(self.log)}")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' if gone); used to make sure a recorded pid was not recycled."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def terminate(pids: list[int], popens: list[subprocess.Popen[bytes]] | None = None, grace: float = 10.0) -> list[int]:
    """SIGTERM each pid's process group, SIGKILL what is still alive after ``grace`` s; return pids that survived."""

    def signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # each component leads its own session, so pgid == pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

    def reap() -> None:
        for p in popens or []:
            with contextlib.suppress(ChildProcessError):
                p.poll()

    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not any(pid_alive(p) for p in pids):
            return []
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reap()
        if not any(pid_alive(p) for p in pids):
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]
