"""Start, track (pid files) and stop the control plane's processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class ComponentFailed(RuntimeError):
    """A control-plane process exited or never became healthy."""


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL; nothing if it has exited already."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit (128 + the signal) and SIGINT KeyboardInterrupt, so a
    bench's `finally` stops what it started when it is stopped (by default a SIGTERM ends
    Python at once: bench-operator's killed run left its etcd behind)."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with it ignored
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that are free right now."""
    # Hold every socket until all are bound, so the kernel cannot hand out one port twice.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that there is none."""
    if not log.exists():
        return f"(no log at {log})"
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(text)


def is_running(pid: int) -> bool:
    """True if pid is alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def command_line(pid: int) -> str:
    """The command line of a pid, '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Supervisor:
    """Runs named processes with a log and a pid file each in one directory."""

    def __init__(self, run_dir: Path, owner_marker: str) -> None:
        self.run_dir = run_dir
        # A pid file only counts when the process's command line contains this marker
        # (the binary cache path), so a recycled pid never gets killed.
        self.owner_marker = owner_marker
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        """Where a component's output goes."""
        return self.run_dir / "logs" / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        """Where a component's pid is recorded."""
        return self.run_dir / "pids" / f"{name}.pid"

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> int:
        """Start a component detached from our session; return its pid."""
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path(name).parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"==> {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            out.flush()
            # Own session: a Ctrl-C in the test run does not reach the control plane
            # before the fixture has had the chance to stop it in order.
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.children[name] = proc
        self.pid_path(name).write_text(f"{proc.pid}\n")
        return proc.pid

    def pid(self, name: str) -> int | None:
        """The recorded pid of a component if that process is still ours and alive."""
        try:
            pid = int(self.pid_path(name).read_text().strip())
        except (OSError, ValueError):
            return None
        if is_running(pid) and self.owner_marker in command_line(pid):
            return pid
        return None

    def check_alive(self, name: str) -> None:
        """Raise with the log tail if a component we started has exited."""
        proc = self.children.get(name)
        if proc is not None and proc.poll() is not None:
            raise ComponentFailed(
                f"{name} exited with code {proc.returncode}; last log lines "
                f"({self.log_path(name)}):\n{log_tail(self.log_path(name))}"
            )

    def stop(self, name: str, timeout: float = 5.0) -> None:
        """SIGTERM a component, SIGKILL it after timeout, and forget its pid file."""
        pid = self.pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._alive(name, pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(name, pid):
                os.kill(pid, signal.SIGKILL)
                while self._alive(name, pid):
                    time.sleep(0.05)
        proc = self.children.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.pid_path(name).unlink(missing_ok=True)

    def _alive(self, name: str, pid: int) -> bool:
        """Alive check that also reaps our own children so they do not linger as zombies."""
        proc = self.children.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return is_running(pid)

    def stop_all(self, names: Sequence[str]) -> None:
        """Stop components in the given order (dependants first)."""
        for name in names:
            self.stop(name)
