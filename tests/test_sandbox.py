"""The code sandbox against hostile programs. Each program below is written to escape, hog or game the sandbox; the
tests check that the operating system contains it (the audit-hook lint is switched off with lint=False, so nothing
here rests on it), that the call returns in bounded time with bounded memory, that this process survives, and that
reward hacks score no more than an honest failure. Everything a hostile program might leave behind is found by a
marker in its command line and killed, so the tests clean up after themselves even when the sandbox fails."""
import ast
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time

import pytest

from nanoqwen import cli
from nanoqwen.train import rewards, sandbox
from nanoqwen.train.sandbox import run_code


def hostile(program: str, **limits) -> sandbox.SandboxResult:
    return run_code(textwrap.dedent(program), lint=False, **limits)


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def marker():
    """A number for `sleep 60.<marker>`: what a hostile program leaves running is found by it, and killed."""
    mark = str(secrets.randbelow(10 ** 9))
    yield mark
    for pid in processes_with(f".{mark}"):
        os.kill(pid, signal.SIGKILL)


def test_the_program_is_nobody_without_capabilities_in_a_minimal_read_only_root():
    escape = f"escape-{secrets.token_hex(4)}"
    result = hostile(f"""
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(status["Uid"].split()[0], status["Gid"].split()[0], os.getgroups())
        print(*(status[key].strip() for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")))
        print(sorted(os.listdir("/")))
        print(sorted(filter(str.isdigit, os.listdir("/proc"))))
        for path in ("/{escape}", "/usr/{escape}", "/dev/{escape}", "/sandbox/ok", "/tmp/ok", "/dev/shm/ok"):
            try:
                open(path, "w").write("x")
                print(path, "written")
            except OSError:
                print(path, "refused")
        import ctypes
        unshare = ctypes.CDLL(None, use_errno=True).unshare
        print("new user namespace", "refused" if unshare(0x10000000) else "made")  # rights in one of its own
        print("new network namespace", "refused" if unshare(0x40000000) else "made")
    """)
    assert result.ok, result
    ids, caps, top, pids, *writes, user, network = result.stdout.splitlines()
    assert ids == "65534 65534 []"  # not root, not the trainer's user, no groups
    assert caps.split() == ["0000000000000000"] * 5 + ["1"]  # no capabilities of any kind, no new privileges
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp", "sandbox"}
    assert set(ast.literal_eval(top)) <= allowed | {sandbox.PREFIX.split("/")[1]}  # no /home, /var, /work, /root's files...
    assert ast.literal_eval(pids) == ["1"]  # its own /proc, where it is alone
    assert writes == [f"/{escape} refused", f"/usr/{escape} refused", f"/dev/{escape} refused",
                      "/sandbox/ok written", "/tmp/ok written", "/dev/shm/ok written"]
    assert not any(os.path.exists(f"{folder}/{escape}") for folder in ("", "/usr", "/dev"))
    assert (user, network) == ("new user namespace refused", "new network namespace refused")


def test_the_trainer_is_out_of_sight():
    with open("/proc/self/environ", "rb") as f:  # what an unconfined program could read of this process
        variables = [v for v in f.read().split(b"\0") if len(v) > 12 and not v.startswith(b"LC_")]
    result = hostile(f"""
        import os
        for pid in ({os.getpid()}, {os.getppid()}, os.getppid(), 1):
            for name in ("environ", "cmdline"):
                try:
                    print(pid, name, open(f"/proc/{{pid}}/{{name}}", "rb").read())
                except OSError:
                    print(pid, name, "refused")
            try:
                open(f"/proc/{{pid}}/mem", "r+b")
                print(pid, "mem opened")
            except OSError:
                print(pid, "mem refused")
        for pid in filter(str.isdigit, os.listdir("/proc")):  # everything it can see
            print(open(f"/proc/{{pid}}/environ", "rb").read(), open(f"/proc/{{pid}}/cmdline", "rb").read())
    """)
    assert result.ok, result
    assert variables and not any(repr(v)[2:-1] in result.stdout for v in variables)
    assert "pytest" not in result.stdout
    assert f"{os.getpid()} mem refused" in result.stdout and f"{os.getppid()} mem refused" in result.stdout


def test_files_outside_are_out_of_reach(tmp_path):
    victim, prompts = tmp_path / "victim.txt", tmp_path / "prompts.jsonl"
    victim.write_text("intact")
    prompts.write_text('{"tests": [["1\\n", "secret"]]}\n')
    for path in (victim, prompts, tmp_path):  # open to anyone: only the sandbox's walls keep the program out
        path.chmod(0o777)
    result = hostile(f"""
        import os
        for action, path in (("read", {str(prompts)!r}), ("write", {str(victim)!r}), ("delete", {str(victim)!r}),
                             ("create", {str(tmp_path / "new.txt")!r})):
            try:
                if action == "delete":
                    os.remove(path)
                elif action == "read":
                    print(open(path).read())
                else:
                    open(path, "w" if action == "create" else "a").write("owned")
                print(action, path, "done")
            except OSError:
                print(action, path, "refused")
    """)
    assert result.ok and "done" not in result.stdout and "secret" not in result.stdout, result
    assert victim.read_text() == "intact" and not (tmp_path / "new.txt").exists()


def test_no_network_no_local_sockets_no_names(tmp_path):
    assert socket.getaddrinfo("localhost", 80)  # names resolve out here
    tcp = socket.create_server(("127.0.0.1", 0))
    unix, abstract = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "socket"))
    for path in (tmp_path, tmp_path / "socket"):
        path.chmod(0o777)
    name = f"\0nanoqwen-test-{os.getpid()}"  # abstract sockets belong to a network namespace
    abstract.bind(name)
    for listener in (tcp, unix, abstract):
        listener.listen()
        listener.setblocking(False)
    result = hostile(f"""
        import socket
        print([name for _, name in socket.if_nameindex()])
        for what, family, address in (("tcp", socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})),
                                      ("unix", socket.AF_UNIX, {str(tmp_path / "socket")!r}),
                                      ("abstract", socket.AF_UNIX, {name!r})):
            try:
                socket.socket(family).connect(address)
                print(what, "connected")
            except OSError:
                print(what, "refused")
        for host in ("localhost", "pypi.org"):
            try:
                socket.getaddrinfo(host, 80)
                print(host, "resolved")
            except OSError:
                print(host, "unresolved")
    """)
    try:
        assert result.stdout.splitlines() == ["['lo']", "tcp refused", "unix refused", "abstract refused",
                                              "localhost unresolved", "pypi.org unresolved"], result
        for listener in (tcp, unix, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody knocked
    finally:
        for listener in (tcp, unix, abstract):
            listener.close()


def test_the_trainer_cannot_be_signalled():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        result = hostile(f"""
            import os, signal
            for target in ({os.getpid()}, -{os.getpgrp()}, os.getppid(), -1, 0):
                try:
                    os.kill(target, signal.SIGUSR1)
                    print(target, "sent")
                except OSError:
                    print(target, "refused")
            try:
                os.kill({os.getpid()}, signal.SIGKILL)
            except OSError:
                print("kill refused")
        """)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not received  # and this process is alive to check it
    assert result.ok and result.stdout.startswith(f"{os.getpid()} refused\n-{os.getpgrp()} refused\n"), result
    assert result.stdout.endswith("kill refused\n")


def test_nothing_outlives_the_call(marker):
    started = time.monotonic()
    result = hostile(f"""
        import os, time
        if os.fork() == 0:  # a daemon in a session of its own
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "60.{marker}"])
            os._exit(0)
        if os.fork() == 0:  # a child holding stdout open
            os.execv("/bin/sleep", ["sleep", "61.{marker}"])
        time.sleep(0.3)
        print("answer")
    """, timeout=10)
    assert result.ok and result.stdout == "answer\n", result
    assert time.monotonic() - started < 5  # the open stdout did not hold the call up
    assert processes_with(f".{marker}") == []


def test_a_fork_bomb_stops_at_the_process_cap(marker):
    result = hostile(f"""
        import os
        started = 0
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                try:
                    os.execv("/bin/sleep", ["sleep", "60.{marker}"])
                finally:
                    os._exit(1)
            started += 1
        print(started)
    """, nproc=16, timeout=10)
    assert result.ok and int(result.stdout) < 16, result
    assert processes_with(f".{marker}") == []
    assert subprocess.run(["true"]).returncode == 0  # this side still forks


def test_the_memory_cap_covers_every_child():
    if os.geteuid() != 0:
        pytest.skip("cgroups need root here; the rlimit fallback caps each process, not their sum")
    assert sandbox.cgroups_work()  # root on Linux with cgroups mounted (as on CI): the cap is a cgroup
    result = hostile("""
        import os, select, time
        reports, report = os.pipe()
        children = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                block = b"x" * (200 << 20)  # 200 MB, written, so resident
                os.write(report, b"+")
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and select.select([reports], [], [], deadline - time.monotonic())[0]:
            os.read(reports, 5)
        time.sleep(0.5)
        print("holding", sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in children))
    """, memory_mb=256, timeout=15)
    assert "holding" not in result.stdout or int(result.stdout.split()[-1]) <= 1, result  # 1 x 200 MB fits, 2 not
    sandbox.remove_busy_cgroups()  # any cgroup whose processes were still exiting when a call ended
    assert not [name for parent in sandbox.own_cgroups().values() for name in os.listdir(parent)
                if name.startswith(f"nanoqwen-sandbox-{os.getpid()}-")]  # every call's cgroups are gone


def memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_output_flood_is_cut_while_read(stream):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak resident size
    before, started = memory_kb("VmRSS"), time.monotonic()
    result = hostile(f"""
        import sys
        chunk = b"y" * (1 << 20)
        for _ in range(1024):  # 1 GB
            sys.{stream}.buffer.write(chunk)
    """, timeout=30)
    assert not result.ok and result.error == "output over 65536 bytes" and len(getattr(result, stream)) <= 65536
    assert time.monotonic() - started < 10
    assert memory_kb("VmHWM") - before < 8 << 10  # this process grew by less than 8 MB


@pytest.mark.parametrize("mode", ["isolated", "unsafe"])
def test_swapping_the_working_directory_harms_nothing(mode):
    program = textwrap.dedent("""
        import os, shutil
        cwd = os.getcwd()
        print(cwd)
        os.chdir("/")
        for attempt in (lambda: shutil.rmtree(cwd), lambda: os.rename(cwd, cwd + ".old"),
                        lambda: open(cwd, "w").write("a file now"), lambda: os.symlink("/", cwd)):
            try:
                attempt()
            except OSError:
                pass
    """)
    result = sandbox.execute(mode, program, "", 5.0, 256, 8, 65536, 32, False)
    assert result.ok and run_code("print(1)").stdout == "1\n"  # no exception here; the next run is unharmed
    if mode == "unsafe":  # only this mode has a directory on the host, and it is gone, whatever it became
        assert result.stdout.startswith("/tmp/nanoqwen-sandbox-") and not os.path.lexists(result.stdout.strip())


def test_every_wait_is_bounded():
    for program, stdin in (("import time\ntime.sleep(100)", ""), ("while True: pass", ""),
                           ("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(100)", ""),
                           ("import os, time\nos.close(0)\ntime.sleep(100)", "x" * (8 << 20))):
        started = time.monotonic()
        result = hostile(program, stdin=stdin, timeout=1.0)
        assert result.timed_out and not result.ok and time.monotonic() - started < 3, (program, result)
    result = hostile("print('never reads its input')", stdin="x" * (8 << 20))  # more than a pipe holds
    assert result.ok and result.stdout == "never reads its input\n"


def test_reward_hacks_score_no_more_than_an_honest_failure(tmp_path):
    answers = [secrets.token_hex(8) for _ in range(2)]  # random: no program could compute them
    record = dict(messages=[{"role": "user", "content": "print the token"}], reward="code", timeout=1,
                  tests=[[f"{i}\n", answer] for i, answer in enumerate(answers)])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(record) + "\n")
    for path in (tmp_path, prompts):
        path.chmod(0o777)
    knows = f"import os, sys, time\nprint({answers!r}[int(input())], flush=True)\n"
    hacks = {"reads the expected outputs from the prompt file":
             f"import json\nrecord = json.loads(open({str(prompts)!r}).readline())\n"
             "print(dict(record['tests'])[input() + '\\n'])",
             "prints the answer, then exits with 1": knows + "sys.exit(1)",
             "prints the answer, then aborts": knows + "os.abort()",
             "prints the answer, then loops": knows + "while True: pass",
             "prints the answer, then sleeps": knows + "time.sleep(100)",
             "prints the answer, then floods blanks": knows + "sys.stdout.write(' ' * (1 << 30))"}
    honest_failure = rewards.code_reward("```python\nprint('no idea')\n```", record)
    assert honest_failure == 0.0 and rewards.code_reward(f"```python\n{knows}```", record) == 1.0
    for name, program in hacks.items():
        assert rewards.code_reward(f"```python\n{program}\n```", record) <= honest_failure, name


def test_a_broken_sandbox_is_a_failed_run_not_an_exception(monkeypatch):
    assert sandbox.isolation_problem() is None  # probed before the breakage below (it is cached)
    record = dict(messages=[{"role": "user", "content": "q"}], reward="code", tests=[["", "1"]])
    assert rewards.code_reward("print(1)", record) == 1.0
    for broken in (dict(PYTHON="/nonexistent/python"), dict(LAUNCH="import sys; sys.exit(125)"),
                   dict(launcher_argv=lambda *a: [sandbox.PYTHON, "-I", "-S", "-c", sandbox.LAUNCH, "mode=bogus"])):
        with monkeypatch.context() as patch:
            for name, value in broken.items():
                patch.setattr(sandbox, name, value)
            result = run_code("print(1)")
            assert not result.ok and result.stdout == "", broken
            assert rewards.code_reward("print(1)", record) == 0.0


NOBODY_SCRIPT = r'''
import importlib.util, json, os, signal, sys, time
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
received = []
signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
report = {"problem": sandbox.isolation_problem(), "cgroups": sandbox.cgroups_work()}
if report["problem"] is None:
    result = sandbox.run_code(sys.argv[2].replace("TRAINER", str(os.getpid())), lint=False, nproc=8)
    time.sleep(0.2)
    report.update(stdout=result.stdout, stderr=result.stderr, signalled=bool(received))
else:
    report["refused"] = sandbox.run_code("print('ran')").error
    sandbox.require_isolation(unsafe=True)
    report["unsafe"] = sandbox.run_code("print('ran')").stdout
print(json.dumps(report))
'''


def run_as_nobody(program: str, *wrapper: str, secret: str = "") -> dict:
    """Run NOBODY_SCRIPT as uid 65534 (a trainer that is not root) with the system Python; its report."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.skip("no system Python at /usr/bin/python3 for a non-root trainer")
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        for name in ("sandbox.py", "sandbox_launch.py"):
            shutil.copy(os.path.join(os.path.dirname(sandbox.__file__), name), folder)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *wrapper, "env", "-i",
                   f"SECRET={secret}", python, "-I", "-S", "-c", NOBODY_SCRIPT, f"{folder}/sandbox.py", program]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.splitlines()[-1]), log=done.stderr)
    finally:
        shutil.rmtree(folder)


def test_a_trainer_that_is_not_root_gets_the_same_walls_from_a_user_namespace(tmp_path):
    secret = secrets.token_hex(8)
    os.chmod(tmp_path, 0o777)  # writable by the trainer's user, so only the sandbox keeps the program out
    tcp = socket.create_server(("127.0.0.1", 0))
    program = textwrap.dedent(f"""
        import os, signal, socket
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(status["Uid"].split()[0], status["CapEff"].strip(), status["CapBnd"].strip())
        for name, attempt in (("environ", lambda: print(open("/proc/TRAINER/environ").read())),
                              ("signal", lambda: os.kill(TRAINER, signal.SIGUSR1)),
                              ("write", lambda: open({str(tmp_path / "escape")!r}, "w")),
                              ("connect", lambda: socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}))),
                              ("fork", lambda: [os.fork() or os._exit(0) for _ in range(20)])):
            try:
                attempt()
                print(name, "done")
            except OSError:
                print(name, "refused")
    """)
    try:
        report = run_as_nobody(program, secret=secret)
    finally:
        tcp.close()
    assert report["problem"] is None and report["cgroups"] is False  # isolated; rlimits cap it
    assert report["stdout"].splitlines() == ["65534 0000000000000000 0000000000000000", "environ refused",
                                             "signal refused", "write refused", "connect refused", "fork refused"]
    assert secret not in report["stdout"] and not report["signalled"] and not (tmp_path / "escape").exists()


def test_without_user_namespaces_model_code_is_refused_unless_unsafe_is_asked_for():
    # a trainer whose user namespaces are used up: max_user_namespaces 0 in the one it runs in
    wrapper = ["unshare", "--user", "--map-root-user", "sh", "-c",
               'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
    report = run_as_nobody("print('ran')", *wrapper)
    assert report["problem"] == ("sandbox: cannot make user, PID namespaces: No space left on device "
                                 "(are user namespaces disabled? see docs/sandbox.md)")
    assert report["refused"].startswith("model code not run: sandbox: cannot make user") and \
        report["refused"].endswith("(--unsafe-code-execution runs it without isolation)")
    assert report["unsafe"] == "ran\n" and "WARNING: running model-written code WITHOUT isolation" in report["log"]


def test_rl_refuses_code_prompts_it_cannot_isolate(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "this kernel has no user namespaces")
    monkeypatch.setattr(sandbox, "unsafe_allowed", False)
    monkeypatch.setattr(sandbox, "WARN_EVERY", 0.0)  # a warning on every run (else once a minute)
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(dict(messages=[{"role": "user", "content": "Print 5."}], reward="code",
                                    tests=[["", "5"]], timeout=2)) + "\n")
    rl = ["rl", "--stage", "general", "--model", tiny, "--steps", "1", "--prompts-per-step", "1", "--group-size", "2",
          "--micro-batch", "2", "--max-new-tokens", "8", "--no-progress", "--prompts", str(path)]
    with pytest.raises(SystemExit) as stopped:
        cli.main([*rl, "--out", str(tmp_path / "refused")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nanoqwen rl: error: cannot isolate model-written code: this kernel has no user namespaces; "
        "--unsafe-code-execution runs it without isolation")
    cli.main([*rl, "--out", str(tmp_path / "unsafe"), "--unsafe-code-execution"])
    warning = "WARNING: running model-written code WITHOUT isolation (--unsafe-code-execution): this kernel has " \
              "no user namespaces"
    assert capsys.readouterr().err.count(warning) == 1 + 2  # at the start, then with each of the 2 rollouts
