"""The launcher of the code sandbox. sandbox.py starts a fresh `python -I -S` that imports this module and calls
launch(), with options as KEY=VALUE arguments and the program on stdin (a length line, then the source; the rest of
stdin is the program's input). Standard library only, no nanoqwen imports and no slow ones: it starts on every call.

    launcher        its own session (and its cgroups, where the parent made them: the parent moves it there before
                    it sends the program); a new PID namespace (and, when not root, a user namespace that maps its
                    uid to 0, which gives it the rights to build the others); forks
    its child       pid 1 of the new PID namespace: new mount, network, IPC, UTS and cgroup namespaces; a minimal
                    root on tmpfs (/usr and the Python prefix read-only, a few devices, a private /proc, writable
                    /tmp, /dev/shm and /sandbox); rlimits; becomes uid 65534 with no capabilities and no new
                    privileges; then runs the program itself (no second interpreter to start). When it exits the
                    kernel kills everything it left behind in the namespace; when the launcher dies (killed by the
                    parent at the deadline) it gets SIGKILL (the parent-death signal), and the namespace goes with it

modes: isolated (all of the above) or unsafe (--unsafe-code-execution: rlimits and a working directory only).
A failure of the launcher itself prints one line starting with "sandbox:" and exits with status 125.
"""
import ctypes
import os
import resource
import select
import sys

SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
NAMESPACES = {CLONE_NEWUSER: "user", CLONE_NEWPID: "PID", CLONE_NEWNS: "mount", CLONE_NEWNET: "network",
              CLONE_NEWIPC: "IPC", CLONE_NEWUTS: "UTS", CLONE_NEWCGROUP: "cgroup"}
MNT_DETACH, O_PATH = 2, 0o10000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, CAPABILITY_VERSION_3 = 47, 4, 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203, "ppc64": 203,
                  "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218}
DEVICES = ("null", "zero", "full", "random", "urandom")
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # links into /usr on merged systems
WORKDIR = "/sandbox"  # the program's working directory
EXIT_FAILED = 125
# audit events the lint refuses: a lint, not a wall (it turns the common escapes into a readable PermissionError;
# the operating system holds without it)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.", "ctypes.dlopen", "os.kill", "signal.pthread_kill")
LIBC = ctypes.CDLL(None, use_errno=True)  # the system calls Python 3.11's os module lacks
for _name, _types in (("mount", (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)),
                      ("umount2", (ctypes.c_char_p, ctypes.c_int)), ("unshare", (ctypes.c_int,)),
                      ("prctl", (ctypes.c_int,) + (ctypes.c_ulong,) * 4),
                      ("syscall", (ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p))):  # pivot_root: no wrapper
    getattr(LIBC, _name).argtypes = _types


class Failed(Exception):
    """A step of the launcher failed; its message names the step."""


def check(result: int, what: str) -> int:
    """`result` of a libc call, or Failed naming `what` failed and why (errno) when it is -1."""
    if result == -1:
        raise Failed(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def unshare(flags: int):
    names = ", ".join(name for flag, name in NAMESPACES.items() if flags & flag)
    check(LIBC.unshare(flags), f"cannot make {names} namespaces")


def prctl(option: int, value: int, what: str):
    check(LIBC.prctl(option, value, 0, 0, 0), what)


def mount(source, target: str, fstype, flags: int, data=None):
    encode = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731 (None stays NULL)
    check(LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def write_file(path: str, text: str):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 16))
        if not chunk:
            raise Failed("stdin closed before the whole program arrived")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_program() -> bytes:
    """The program from stdin: a decimal length and a newline, then that many bytes. Reads nothing past them: the
    rest of stdin is the program's input."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte or len(header) > 20:
            raise Failed("no program on stdin")
        header += byte
    return read_exactly(0, int(header))


def flags_of(path: str) -> int:
    """The mount flags a read-only bind of `path` must keep (a remount in a user namespace may not clear them)."""
    f = os.statvfs(path).f_flag
    return (f & (MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)) | (MS_RELATIME if f & 4096 else 0)


def read_only_binds(options: dict) -> list[str]:
    """The host paths the program's root shows read-only: /usr, the Python prefix, the loader cache, and /bin, /lib..
    when they are directories rather than links into /usr."""
    paths = ["/usr", *options.get("bind", []), "/etc/ld.so.cache"]
    paths += [p for p in TOP_LEVEL if os.path.isdir(p) and not os.path.islink(p)]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def build_root(root: str, options: dict):
    """A minimal root at `root`: read-only binds, devices, a private /proc, size-capped writable tmpfs mounts."""
    limit = f"size={options['file_mb']}m,nr_inodes=4096,mode=1777"
    binds = read_only_binds(options)
    handles = {path: os.open(path, O_PATH | os.O_CLOEXEC) for path in binds}  # opened before /tmp is covered
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    for path in binds:
        target = root + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
        mount(f"/proc/self/fd/{handles[path]}", target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | flags_of(path))
        os.close(handles[path])
    for link in TOP_LEVEL:
        if os.path.islink(link):
            os.symlink(os.readlink(link), root + link)
    os.mkdir(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in DEVICES:  # bound from the host: creating device nodes needs privileges a user namespace lacks
        os.close(os.open(f"{root}/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for path in ("/dev/shm", "/tmp", WORKDIR):
        os.mkdir(root + path)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, limit)
    os.mkdir(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter_root(root: str):
    """Make `root` the root of this mount namespace and drop the old one, then make it read-only."""
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise Failed(f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(root)
    check(LIBC.syscall(number, b".", b"."), "pivot_root")  # the old root ends up stacked under the new one...
    check(LIBC.umount2(b".", MNT_DETACH), "umount the old root")  # ...and is detached, with all under it
    os.chdir("/")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def set_limits(options: dict):
    memory, files, cpu = options["memory_mb"] << 20, options["file_mb"] << 20, options["cpu_seconds"]
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, files),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256),
                         (resource.RLIMIT_NPROC, options["nproc"])):
        resource.setrlimit(limit, (value, value))


def drop_capabilities():
    """Empty every capability set: bounding, ambient, then effective, permitted and inheritable."""
    for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
        prctl(PR_CAPBSET_DROP, cap, "drop the capability bounding set")
    check(LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear the ambient capabilities")
    header, data = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0), (ctypes.c_uint32 * 6)()
    check(LIBC.capset(header, data), "drop the capabilities")


def become_nobody(as_root: bool):
    """Become uid/gid 65534 with no capabilities and no new privileges. As root: setresuid (the host's uid 65534). In
    a user namespace: a nested one where this (mapped) uid is 65534, so that even inside it the program is not root."""
    if as_root:
        os.setgroups([])
        os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        prctl(PR_SET_DUMPABLE, 1, "set dumpable")  # the uid change cleared it, which hides /proc/self from us
        unshare(CLONE_NEWUSER)  # one of its own: rights there own nothing, and it counts only its processes
        uid, gid = SANDBOX_UID, SANDBOX_GID
    else:
        uid, gid = os.geteuid(), os.getegid()
        unshare(CLONE_NEWUSER)
    write_file("/proc/self/uid_map", f"{SANDBOX_UID} {uid} 1\n")
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/gid_map", f"{SANDBOX_GID} {gid} 1\n")
    write_file("/proc/sys/user/max_user_namespaces", "0")  # none below: user namespaces would give rights back
    drop_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


def init(options: dict, launcher_alive: int, as_root: bool):
    """Pid 1 of the new PID namespace: build the sandbox and step into it."""
    os.setsid()  # its own session: kill(0, ...) in the sandbox reaches only the sandbox
    unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    build_root("/tmp", options)
    enter_root("/tmp")
    os.chdir(WORKDIR)
    set_limits(options)
    become_nobody(as_root)
    prctl(PR_SET_PDEATHSIG, 9, "set the parent-death signal")  # after the uid change, which clears it
    if select.select([launcher_alive], [], [], 0)[0]:  # end of file: the launcher died before the line above
        os._exit(EXIT_FAILED)
    os.closerange(3, 1 << 16)


def maps_nobody() -> bool:
    """Root of a user namespace that holds uid 65534 (a host's root; not root of a namespace mapping only itself)."""
    with open("/proc/self/uid_map") as f:
        return any(int(inside) <= SANDBOX_UID < int(inside) + int(count) for inside, _, count in map(str.split, f))


def isolated(options: dict):
    """Returns only in the child that is to run the program, inside the sandbox."""
    as_root = os.geteuid() == 0 and maps_nobody()
    if as_root:
        unshare(CLONE_NEWPID)
    else:  # the user namespace comes first and gives this process the rights to make the PID namespace
        uid, gid = os.geteuid(), os.getegid()
        unshare(CLONE_NEWUSER | CLONE_NEWPID)
        write_file("/proc/self/uid_map", f"0 {uid} 1\n")
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/gid_map", f"0 {gid} 1\n")
    launcher_alive, held = os.pipe()  # the launcher holds the write end: end of file means it died
    pid = os.fork()
    if pid == 0:
        os.close(held)
        try:
            return init(options, launcher_alive, as_root)
        except BaseException as e:  # noqa: BLE001 (whatever failed, the sandbox is not there: say which step)
            os.write(2, f"sandbox: {e}\n".encode())
            os._exit(EXIT_FAILED)
    exit_like(wait_with_deadline(pid, options["deadline"]))


def unsafe(options: dict):
    """No isolation (--unsafe-code-execution): rlimits, the working directory the parent made, a process group of
    its own, killed at the end. Returns only in the child that is to run the program."""
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        prctl(PR_SET_PDEATHSIG, 9, "set the parent-death signal")  # it dies with the launcher, as in the sandbox
        if os.getppid() != launcher:
            os._exit(EXIT_FAILED)
        os.chdir(options["workdir"])
        set_limits(options)
        return
    status = wait_with_deadline(pid, options["deadline"])
    try:
        os.killpg(pid, 9)  # whatever it left in its group
    except OSError:
        pass
    exit_like(status)


def wait_with_deadline(pid: int, seconds: float) -> int:
    """The wait status of child `pid`, killing it when `seconds` pass first."""
    pidfd = os.pidfd_open(pid)
    if not select.select([pidfd], [], [], seconds)[0]:
        os.kill(pid, 9)
    return os.waitpid(pid, 0)[1]


def exit_like(status: int):
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def run_program(options: dict, source: bytes):
    """Run the program in this interpreter as a script would run: exit status 0, 1 after an uncaught exception
    (its traceback on stderr) or SystemExit's code; then exit at once, without the interpreter's slow teardown."""
    if options["lint"]:
        def lint(event, args, blocked=BLOCKED):
            if event.startswith(blocked):
                raise PermissionError(f"sandbox: {event} is not allowed")
        sys.addaudithook(lint)
    sys.argv, sys.path[:] = [""], sys.path[1:]  # the launcher's folder is not the program's to import from
    status = 0
    try:
        exec(compile(source, "<model code>", "exec"), {"__name__": "__main__"})
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (as the interpreter does at the top level)
        sys.excepthook(*sys.exc_info())
        status = 1
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()  # the interpreter would wait for the program's threads
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # the interpreter's status when it cannot flush stdout
    os._exit(status & 0xFF)


def parse(argv: list[str]) -> dict:
    options = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "bind":
            options.setdefault(key, []).append(value)
        else:
            options[key] = value if key in ("mode", "workdir") else float(value) if key == "deadline" else int(value)
    return options


def main() -> tuple[dict, bytes]:
    """Launch; returns (options, program) in the process that is to run it."""
    try:
        os.setsid()
        options = parse(sys.argv[1:])
        source = read_program()
        {"isolated": isolated, "unsafe": unsafe}[options["mode"]](options)
        return options, source
    except (Failed, OSError, ValueError, KeyError) as e:
        os.write(2, f"sandbox: {e}\n".encode())
        os._exit(EXIT_FAILED)


def launch():
    run_program(*main())
