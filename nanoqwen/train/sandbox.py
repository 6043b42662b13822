"""Run model-written code for a reward, contained: a fresh `python -I` in a subprocess, an empty environment, a
temporary working directory, CPU-time / memory / file-size limits (resource.setrlimit), and an audit hook that refuses
sockets, subprocesses, exec and fork before the code starts. The `code` reward kind (rewards.code_reward) runs
model-written programs through it; none of the embedded tasks needs it.

    result = run_code("print(sum(range(10)))", timeout=2.0, memory_mb=256)
    result.ok, result.stdout, result.stderr, result.timed_out
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs in the child before the user's code; blocked events raise, so the code sees a plain PermissionError.
PRELUDE = r'''
import sys
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.", "ctypes.dlopen", "os.kill", "signal.pthread_kill")
def _guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
source = sys.stdin.read()
sys.stdin = open("input.txt") if __import__("os").path.exists("input.txt") else sys.stdin
exec(compile(source, "<model code>", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    ok: bool          # exited with status 0 in time
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool


def _limits(memory_mb: int, cpu_seconds: int, file_mb: int):
    def apply():  # in the child, between fork and exec
        memory = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()  # its own process group: a timeout kills everything it started
    return apply


def run_code(code: str, stdin: str = "", timeout: float = 5.0, memory_mb: int = 256, file_mb: int = 8,
             max_output: int = 65536) -> SandboxResult:
    """Execute `code` with `stdin` as its input; wall-clock `timeout`, address space `memory_mb`, no network."""
    with tempfile.TemporaryDirectory(prefix="nanoqwen-sandbox-") as workdir:
        with open(os.path.join(workdir, "input.txt"), "w") as f:
            f.write(stdin)
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", PRELUDE], cwd=workdir, env={},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=_limits(memory_mb, int(timeout) + 1, file_mb), close_fds=True)
        try:
            out, err = process.communicate(code.encode(), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            out, err = process.communicate()
            timed_out = True
    out, err = out[:max_output].decode(errors="replace"), err[:max_output].decode(errors="replace")
    code_ = None if timed_out else process.returncode
    return SandboxResult(ok=code_ == 0, stdout=out, stderr=err, returncode=code_, timed_out=timed_out)
