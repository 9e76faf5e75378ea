"""What the HTTP benchmarks share: a `turboserve serve` they start and stop themselves (SpawnedServer), the
loopback-only guard, the machine's description for the record, and CPU accounting over a timed phase
(CpuMeter: who used the CPU while we measured, from /proc). Used by bench/loadgen.py, bench/live_policies.py
and bench/overload.py.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address: this tool must not load other machines."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"bench: {url} is not a loopback address (127.0.0.0/8, ::1 or localhost)")


def machine_info() -> dict:
    """CPU model, core count, Python and torch versions, for the record."""
    from models.runtime import cpu_name  # noqa: PLC0415

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


class CpuMeter:
    """CPU seconds used over a phase: by the whole machine, by this process, and by `pids` (e.g. the server).

    Reads /proc; on a shared machine `other_s` (busy time of every other process) shows how much
    CPU the measurement had to share. All fields are None where /proc is not there.
    """

    def __init__(self, pids: tuple[int, ...] = (), judge: bool = True):
        self.pids = pids
        self.judge = judge  # False when the timed work runs in a process we do not watch (--url without --server-pid)
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _machine_busy(self) -> tuple[float, float] | None:
        """(busy, steal) CPU seconds of the whole machine since boot; steal is time the hypervisor took."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        fields += [0] * (8 - len(fields))
        idle = fields[3] + fields[4]  # idle + iowait
        steal = fields[7]
        return (sum(fields[:7]) - idle) / self.tick, steal / self.tick  # guest time is already inside user

    def _pid_cpu(self, pid: int) -> float | None:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(parts[11]) + int(parts[12])) / self.tick  # utime + stime, all threads

    def snapshot(self) -> tuple:
        own = os.times()
        return (time.perf_counter(), self._machine_busy(), own.user + own.system,
                [self._pid_cpu(p) for p in self.pids])

    def since(self, start: tuple) -> dict:
        """Seconds of wall time and CPU time since `start` (a snapshot)."""
        end = self.snapshot()
        wall = end[0] - start[0]
        out = {"wall_s": round(wall, 3), "loadgen_cpu_s": round(end[2] - start[2], 3)}
        watched = 0.0
        for pid, a, b in zip(self.pids, start[3], end[3]):
            if a is not None and b is not None:
                out[f"pid{pid}_cpu_s"] = round(b - a, 3)
                watched += b - a
        if start[1] is not None and end[1] is not None:
            busy = end[1][0] - start[1][0]
            out["machine_busy_s"] = round(busy, 3)
            out["steal_s"] = round(end[1][1] - start[1][1], 3)
            out["machine_capacity_s"] = round(wall * (os.cpu_count() or 1), 3)
            out["other_s"] = round(max(0.0, busy - out["loadgen_cpu_s"] - watched), 3)
            # Without watched pids (--url without --server-pid) the server itself counts as "other".
            out["contended"] = self.judge and (out["other_s"] + out["steal_s"]) > 0.05 * out["machine_capacity_s"]
        try:
            out["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        except OSError:
            pass
        return out


def print_cpu(cpu: dict) -> None:
    if "machine_busy_s" not in cpu:
        return
    server = next((v for k, v in cpu.items() if k.startswith("pid")), None)
    parts = [f"machine busy {cpu['machine_busy_s']:.1f} of {cpu['machine_capacity_s']:.1f} CPU-s",
             f"loadgen {cpu['loadgen_cpu_s']:.1f}"]
    if server is not None:
        parts.append(f"server {server:.1f}")
    parts.append(f"other processes {cpu['other_s']:.1f}, hypervisor steal {cpu['steal_s']:.1f}")
    print(f"  cpu        : {', '.join(parts)} (loadavg {' '.join(cpu.get('loadavg_end', []))})")
    if cpu.get("contended"):
        print("  WARNING    : other processes (or the hypervisor) took over 5% of the CPU during this phase; "
              "its numbers are not clean")


def free_port() -> int:
    """A loopback TCP port free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


class SpawnedServer:
    """`turboserve serve` on a free loopback port, as a subprocess whose log goes to a temp file."""

    def __init__(self, extra_args: list[str], startup_timeout: float, checkout: Path | None = None):
        """checkout: serve the code of another checkout (an A/B against an older commit) instead of this one."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.cwd = checkout or REPO_ROOT
        exe = Path(sys.executable).parent / "turboserve"
        # `python -m` imports from the working directory first: the checkout's own server package.
        cmd = [str(exe)] if exe.exists() and checkout is None else [sys.executable, "-m", "server.cli"]
        self.cmd = [*cmd, "serve", "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        fd, log_name = tempfile.mkstemp(prefix="turboserve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        print(f"spawning: {' '.join(self.cmd)}  (log: {self.log_path})", flush=True)
        # `timeout` (gpu_check.sh's parts) ends a bench with SIGTERM, whose default skips the callers' `finally: stop()`
        # and leaves the server (its own session) running on, holding the device: make it an exit that unwinds.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(base_url=self.url, trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"bench: the server exited with {self.proc.returncode} while starting:\n{self.tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        print(f"server ready at {self.url} after {self.startup_timeout - (deadline - time.monotonic()):.1f}s",
                              flush=True)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"bench: the server did not answer GET /health with 200 in {self.startup_timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL if it does not exit within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
