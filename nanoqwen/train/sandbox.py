"""Run model-written code for a reward, isolated by the operating system (docs/sandbox.md has the whole picture).

Each call starts a fresh launcher (sandbox_launch.py, no preexec_fn, so the parent is never forked) that builds
Linux namespaces around the program: its own PID, network (no interfaces but a downed loopback), IPC, UTS and mount
namespaces, a read-only minimal root with private writable /sandbox (the working directory), /tmp and /dev/shm, uid
65534 with no capabilities and no new privileges, and a memory and process cap over every descendant (cgroups where
this process may make them, rlimits otherwise). When the program exits, or the deadline passes, the whole namespace
is killed. This side bounds every wait, caps the output while reading it, and turns any failure of the machinery
into a failed run, never an exception.

    result = run_code("print(sum(range(10)))", timeout=2.0, memory_mb=256)
    result.ok, result.stdout, result.stderr, result.timed_out

Where the isolation cannot be built (not Linux, no user namespaces, ...), model code is not run: the result says
why, and `require_isolation()` stops a command with that one line, unless `require_isolation(unsafe=True)`
(--unsafe-code-execution) allows running it with rlimits only, under a warning that repeats.
"""
from __future__ import annotations

import atexit
import functools
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# imported rather than run as a script, so its compiled form is cached
LAUNCH = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); " \
         "import sandbox_launch; sandbox_launch.launch()"
PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)  # stdlib only: no venv needed
PREFIX = os.path.realpath(sys.base_prefix)
KILL_GRACE = 2.0    # seconds to wait for a killed launcher to be reaped
WARN_EVERY = 60.0   # seconds between repeats of the unsafe-execution warning
unsafe_allowed = False
_last_warning = -WARN_EVERY
busy_cgroups: list[str] = []  # cgroups whose processes were still exiting when their call ended


@dataclass
class SandboxResult:
    ok: bool          # exited with status 0 in time, output within the cap, sandbox intact
    stdout: str
    stderr: str
    returncode: int | None  # the program's exit status (128 + N when killed by signal N); None when stopped
    timed_out: bool
    error: str | None = None  # why the run was stopped or not made (output over the cap, sandbox failure)


def failed(error: str, stdout: bytes = b"", stderr: bytes = b"", timed_out: bool = False) -> SandboxResult:
    return SandboxResult(False, stdout.decode(errors="replace"), stderr.decode(errors="replace"), None, timed_out,
                         error)


# --- cgroups: one memory and pids cap over the program and all its descendants --------------------------------

V1_LIMITS = {"memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"), "pids": ("pids.max",)}
V2_LIMITS = ("memory.max", "memory.swap.max", "pids.max")


def own_cgroups() -> dict[str, str]:
    """{hierarchy: this process's cgroup directory} for the v1 memory and pids hierarchies, else the v2 one."""
    found = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(","):
                if name in V1_LIMITS and os.path.isdir(f"/sys/fs/cgroup/{name}"):
                    found[name] = f"/sys/fs/cgroup/{name}{path}"
            if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                found["unified"] = f"/sys/fs/cgroup{path}"
    if set(V1_LIMITS) <= set(found):
        return {name: found[name] for name in V1_LIMITS}
    return {"unified": found["unified"]} if "unified" in found else {}


def make_cgroups(memory_mb: int, nproc: int) -> list[str]:
    """Fresh child cgroups of this process's own (so its limits still apply) capping memory (swap included) and
    processes (nproc, and the launcher); [] when they cannot be made here (not root, no delegation): rlimits then
    do the capping."""
    remove_busy_cgroups(0.0)
    name, made = f"nanoqwen-sandbox-{os.getpid()}-{time.monotonic_ns()}", []
    try:
        for hierarchy, parent in own_cgroups().items():
            path = os.path.join(parent, name)
            os.mkdir(path)
            made.append(path)
            files = V1_LIMITS[hierarchy] if hierarchy != "unified" else V2_LIMITS
            for file in files:
                value = 0 if file == "memory.swap.max" else nproc + 1 if file == "pids.max" else memory_mb << 20
                if os.path.exists(os.path.join(path, file)):
                    with open(os.path.join(path, file), "w") as f:
                        f.write(str(value))
                elif file != "memory.memsw.limit_in_bytes" and file != "memory.swap.max":  # no swap accounting
                    raise OSError(f"{path} has no {file}")
        return made
    except OSError:
        remove_cgroups(made, 0.0)
        return []


def remove_cgroups(paths: list[str], wait: float = 1.0):
    """Remove the cgroups once their processes are gone (the kernel may still be tearing the namespace down); those
    still busy after `wait` seconds are left to the next call, or to the end of this process."""
    deadline = time.monotonic() + wait
    for path in reversed(paths):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    busy_cgroups.append(path)
                    break
                time.sleep(0.005)


@atexit.register
def remove_busy_cgroups(wait: float = 2.0):
    paths, busy_cgroups[:] = busy_cgroups[:], []
    remove_cgroups(paths, wait)


def join_cgroups(pid: int, paths: list[str]):
    for path in paths:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))


@functools.cache
def cgroups_work() -> bool:
    """Whether this process may make capped cgroups and move a child into them (tried once)."""
    made = make_cgroups(64, 8)
    if not made:
        return False
    try:
        with subprocess.Popen([PYTHON, "-I", "-S", "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE) as waiting:  # until this side closes its input
            join_cgroups(waiting.pid, made)
        return True
    except OSError:
        return False
    finally:
        remove_cgroups(made)


def remove_tree(path: str):
    """Remove what the program left at `path`: a tree, a file, or a link (removed, not followed)."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.unlink(path)
    except OSError:
        pass


# --- one run ------------------------------------------------------------------------------------------------------

def launcher_argv(mode: str, timeout: float, memory_mb: int, file_mb: int, nproc: int, lint: bool,
                  workdir: str | None) -> list[str]:
    binds = [] if PREFIX.startswith("/usr/") else [PREFIX]
    if not PYTHON.startswith(("/usr/", PREFIX + "/")):
        binds.append(os.path.dirname(PYTHON))
    options = dict(mode=mode, memory_mb=memory_mb, file_mb=file_mb, nproc=nproc, cpu_seconds=int(timeout) + 1,
                   deadline=timeout + 1.0, lint=int(lint), **({"workdir": workdir} if workdir else {}))
    return [PYTHON, "-I", "-S", "-c", LAUNCH, *(f"{k}={v}" for k, v in options.items()),
            *(f"bind={path}" for path in binds)]


def exchange(process: subprocess.Popen, payload: bytes, deadline: float, max_output: int):
    """Feed `payload` to stdin and read stdout/stderr until both close, at most `max_output` bytes each, before
    `deadline`. Returns (stdout, stderr, why it stopped early or None)."""
    out, err, stopped = bytearray(), bytearray(), None
    buffers = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    stdin, sent = process.stdin.fileno(), 0
    os.set_blocking(stdin, False)
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_WRITE)
    try:
        while stopped is None and len(selector.get_map()) > (stdin in selector.get_map()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
            for key, _ in selector.select(remaining) if remaining > 0 else []:
                if key.fd == stdin:
                    try:
                        sent += os.write(stdin, payload[sent:sent + (1 << 16)])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it stopped reading: the rest of its input is dropped
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                elif len(buffers[key.fd]) + len(chunk) > max_output:
                    stopped = f"output over {max_output} bytes"
                    break
                else:
                    buffers[key.fd] += chunk
    finally:
        selector.close()
    return bytes(out), bytes(err), stopped


def stop(process: subprocess.Popen):
    """Kill the launcher if it still runs (its init dies with it, by the parent-death signal, and the namespace
    with that), reap it, close the pipes."""
    if process.returncode is None:
        process.kill()
        try:
            process.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()


def execute(mode: str, code: str, stdin: str, timeout: float, memory_mb: int, file_mb: int, max_output: int,
            nproc: int, lint: bool) -> SandboxResult:
    """One run of `code` through the launcher in `mode` ("isolated" or "unsafe")."""
    source = code.encode(errors="replace")
    payload = b"%d\n" % len(source) + source + stdin.encode(errors="replace")
    cgroups = make_cgroups(memory_mb, nproc) if mode == "isolated" and cgroups_work() else []
    workdir = tempfile.mkdtemp(prefix="nanoqwen-sandbox-") if mode == "unsafe" else None  # isolated: a tmpfs
    try:
        deadline = time.monotonic() + timeout
        process = subprocess.Popen(launcher_argv(mode, timeout, memory_mb, file_mb, nproc, lint, workdir),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={})
        try:
            join_cgroups(process.pid, cgroups)  # while it starts; it forks only once it has the program, sent next
            out, err, stopped = exchange(process, payload, deadline, max_output)
            if stopped is None:
                process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            stopped = "timeout"
        finally:
            stop(process)
    finally:
        remove_cgroups(cgroups)
        if workdir:
            remove_tree(workdir)
    if stopped:
        return failed(stopped, out, err, timed_out=stopped == "timeout")
    status = process.returncode
    return SandboxResult(status == 0, out.decode(errors="replace"), err.decode(errors="replace"), status, False)


# --- isolation available, refused, or waived ----------------------------------------------------------------------

@functools.cache
def isolation_problem() -> str | None:
    """Why model code cannot be isolated here (one line), or None when it can: checked by running a probe."""
    if not sys.platform.startswith("linux"):
        return f"OS isolation needs Linux namespaces; this is {sys.platform}"
    for ns in ("user", "pid", "net", "mnt", "ipc"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"this kernel has no {ns} namespaces"
    try:
        probe = execute("isolated", "print('ok')", "", 30.0, 256, 1, 4096, 8, False)
    except Exception as e:  # noqa: BLE001 (the probe failing in any way means no isolation)
        return f"the sandbox launcher could not start: {e}"
    if probe.ok and probe.stdout == "ok\n":
        return None
    lines = [line for line in probe.stderr.splitlines() if line.startswith("sandbox:")]
    why = lines[-1] if lines else probe.error or f"the probe exited with status {probe.returncode}"
    hint = " (are user namespaces disabled? see docs/sandbox.md)" if "user" in why else ""
    return f"{why}{hint}"


def require_isolation(unsafe: bool = False):
    """Stop (RuntimeError, one line) when model code cannot be isolated here, unless `unsafe`
    (--unsafe-code-execution) allows running it with rlimits only; the warning repeats while it does."""
    global unsafe_allowed
    problem = isolation_problem()
    if problem and not unsafe:
        raise RuntimeError(f"cannot isolate model-written code: {problem}; "
                           "--unsafe-code-execution runs it without isolation")
    unsafe_allowed = unsafe
    if problem:
        warn_unsafe(problem)


def warn_unsafe(problem: str):
    """Print the unsafe-execution warning, at most once every WARN_EVERY seconds, so the logs keep showing it."""
    global _last_warning
    if time.monotonic() - _last_warning >= WARN_EVERY:
        _last_warning = time.monotonic()
        print(f"WARNING: running model-written code WITHOUT isolation (--unsafe-code-execution): {problem}",
              file=sys.stderr, flush=True)


def run_code(code: str, stdin: str = "", timeout: float = 5.0, memory_mb: int = 256, file_mb: int = 8,
             max_output: int = 65536, nproc: int = 32, lint: bool = True) -> SandboxResult:
    """Execute `code` with `stdin` as its input, isolated: wall-clock `timeout` (seconds), `memory_mb` over all its
    processes, at most `nproc` processes, files up to `file_mb`, `max_output` bytes on each of stdout and stderr.
    `lint`: an audit hook that refuses sockets, subprocesses and fork early with a readable error. Never raises."""
    try:
        problem = isolation_problem()
        if problem and not unsafe_allowed:
            return failed(f"model code not run: {problem} (--unsafe-code-execution runs it without isolation)")
        if problem:
            warn_unsafe(problem)
        return execute("unsafe" if problem else "isolated", code, stdin, timeout, memory_mb, file_mb, max_output,
                       nproc, lint)
    except Exception as e:  # noqa: BLE001 (a failure of the machinery is a failed run, never the trainer's crash)
        return failed(f"sandbox: {type(e).__name__}: {e}")
