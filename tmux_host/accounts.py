"""Users' OS accounts on this host, and the limits their processes run under.

Each user of the system is an *account* here: account N runs as uid and gid ``account_uid_base + N`` (N is
allocated once per user in PostgreSQL, so it is the same on every host), has a home of its own (0700), its own
tmux server, and a cgroup with its limits. The host keeps the one privilege this needs (switching users: root or
CAP_SETUID/CAP_SETGID); everything the account's processes touch is theirs alone, and everything they could write
is treated as hostile by the host.

Directory layout, under the host's directory ``<socket_dir>/<host_id>`` (0711, the host's):
- ``a<N>/``     0710, the account's, group of the host: its tmux server's socket (``a<N>/tmux``)
- ``x/a<N>/``   0710, the host's, group of the account: exec scripts and result FIFOs, screen captures, pasted
  input. The account can open the files the host made there but can neither list, create, rename nor replace
  any, so the host never follows a link or opens a FIFO it did not make.

Processes are started as ``sh -c '<_GO>' sh <cgroup files> -- setpriv --reuid=U --regid=G --clear-groups
--no-new-privs -- tmux ...``: while ``read`` waits for its first line, the host sets the rlimits and OOM score of
the (still root-owned, so the host may lower its limits without CAP_SYS_RESOURCE, which containers lack)
process, then lets it go; it moves itself into the account's cgroups, and setpriv drops to the account for good:
no process of the account can gain privileges through a setuid or file-capability binary. No Python runs between
fork and exec (``preexec_fn`` is unsafe with threads).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import resource
import shutil
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmux_host.control import SHELL_HOOKS
from tmuxi.observability import logger
from tmuxi.settings import Settings, env_name

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the host keeps of root (``python -m tmux_host`` re-executes itself under setpriv with only these):
# switching to an account (setuid, setgid), giving it its directories (chown, fowner), ending its processes
# (kill), and reaching a local PostgreSQL socket in a directory of the database's own user (dac_read_search;
# absent on ECS, where the database is over TCP). No dac_override: the host cannot write files it does not own.
HOST_CAPABILITIES = {"chown": 0, "dac_read_search": 2, "fowner": 3, "kill": 5, "setgid": 6, "setuid": 7}
_CAP_NAMES = dict(enumerate("""
    chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable net_bind_service
    net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin
    sys_boot sys_nice sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap
    mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore
""".split()))  # noqa: SIM905 - linux/capability.h, in order
# Held until the host has set its limits (one line on stdin); then the process moves itself into each cgroup named
# before "--" and execs the rest. A process moving itself (writing 0) takes the kernel's fast path: ~0.1 ms, where
# the host writing its pid to cgroup.procs costs ~10 ms (cgroup v1 waits for an RCU grace period).
_GO = 'read -r _ || exit 1; while [ "$1" != -- ]; do echo 0 > "$1" || exit 1; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class Account:
    number: int  # allocated per user in PostgreSQL (users.account_no)
    uid: int
    gid: int
    home: Path

    @property
    def name(self) -> str:
        return f"a{self.number}"


def ensure_dir(path: Path, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Create ``path`` with ``mode`` and owner; repair mode and owner of one we made before. Refuses a symlink,
    a non-directory, and a directory owned by anyone but us or the intended owner (someone else planted it)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} is not a directory (symlink or file); refusing to use it")
    me = os.getuid()
    want_uid = me if uid is None else uid
    if st.st_uid not in (me, want_uid):
        raise RuntimeError(f"{path} is owned by uid {st.st_uid}, not us ({me}); refusing to use it")
    want_gid = st.st_gid if gid is None else gid
    if (st.st_uid, st.st_gid) != (want_uid, want_gid):
        os.chown(path, want_uid, want_gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode, follow_symlinks=False)


def check_reachable(path: Path) -> None:
    """Every directory above ``path`` must let other users through (x), or no account reaches what is below."""
    for parent in path.absolute().parents:
        if parent.exists() and not os.stat(parent).st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{parent} is not traversable by other users (mode o-x), so the users' accounts "
                               f"cannot reach {path}: chmod o+x {parent}, or choose another directory")


def capabilities(which: str = "CapEff", pid: str = "self") -> list[str]:
    """A process's capabilities by name (``CapEff``, ``CapBnd``, ... of /proc/PID/status)."""
    mask = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mask = int(Path(f"/proc/{pid}/status").read_text().split(f"{which}:")[1].split()[0], 16)
    return [_CAP_NAMES.get(bit, f"cap_{bit}") for bit in range(64) if mask >> bit & 1]


def reduced_capabilities_argv(argv: list[str]) -> list[str] | None:
    """The command that runs ``argv`` with no capability but HOST_CAPABILITIES, or None when this process holds
    no more than those already (or is not root, or setpriv is missing)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    if set(capabilities("CapBnd")) <= set(HOST_CAPABILITIES):
        return None
    keep = ",".join(f"+{c}" for c in HOST_CAPABILITIES)
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--", *argv]


# --- cgroups ---------------------------------------------------------------------------------------------------
def subtree_name(settings: Settings) -> str:
    """The host's cgroup subtree: its id, and a digest of its socket directory (stable across its restarts)."""
    digest = hashlib.sha256(str(settings.resolved_socket_dir).encode()).hexdigest()[:8]
    return f"{settings.host_id}-{digest}"


@dataclass
class Cgroups:
    """The host's own cgroup subtree for accounts: ``<own cgroup>/tmuxi-<name>/a<N>`` in each controller, where
    ``name`` is the host id and a digest of its socket directory (``subtree_name``): two stacks on one machine
    (``make run`` beside ``make test``) never share, and never reap, each other's cgroups, and a restarted host
    finds its own again. cgroup v1 (one hierarchy per controller: memory, pids) or v2 (one unified hierarchy)."""

    version: int
    roots: list[Path]  # per controller (v1) or the one unified root (v2)

    @classmethod
    def probe(cls, name: str, base: Path = Path("/sys/fs/cgroup")) -> Cgroups | None:
        own = _own_cgroups()
        try:
            if (base / "cgroup.controllers").exists():  # v2 only
                return cls._probe_v2(base / own.get("", "/").lstrip("/"), name)
            roots = []
            for ctrl in ("memory", "pids"):
                mount = base / ctrl
                if not (mount / "cgroup.procs").exists():
                    return None
                root = mount / own.get(ctrl, "/").lstrip("/") / f"tmuxi-{name}"
                root.mkdir(exist_ok=True)
                roots.append(root)
            return cls(1, roots)
        except OSError as exc:
            logger.warning("cgroups not writable here; per-process limits only", extra={"error": str(exc)})
            return None

    @classmethod
    def _probe_v2(cls, own: Path, name: str) -> Cgroups | None:
        root = own / f"tmuxi-{name}"
        root.mkdir(exist_ok=True)
        try:
            (own / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # "no internal processes": the host must leave its own cgroup for a leaf before it can delegate
            leaf = own / "tmuxi-service"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            (own / "cgroup.subtree_control").write_text("+memory +pids")
        (root / "cgroup.subtree_control").write_text("+memory +pids")
        return cls(2, [root])

    def dirs(self, account: Account) -> list[Path]:
        return [root / account.name for root in self.roots]

    def prepare(self, account: Account, memory_bytes: int, max_pids: int) -> None:
        for d in self.dirs(account):
            d.mkdir(exist_ok=True)
            limits = {
                "memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes,
                "memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": max_pids,
            }
            for name, value in limits.items():
                f = d / name
                if f.exists():
                    with contextlib.suppress(OSError):  # memsw: only with swap accounting
                        f.write_text(str(value))

    def join_files(self, account: Account) -> list[Path]:
        """What a process writes 0 to, to move itself in: per thread in v1 (``tasks``: no threadgroup lock)."""
        return [d / ("tasks" if self.version == 1 else "cgroup.procs") for d in self.dirs(account)]

    def pids(self, account: Account) -> set[int]:
        found: set[int] = set()
        for d in self.dirs(account):
            with contextlib.suppress(OSError):
                found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        return found

    def reap(self, account: Account) -> None:
        """SIGKILL everything left in the account's cgroup (its sessions are over), then remove it."""
        for _ in range(20):
            pids = self.pids(account)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for d in self.dirs(account):
            with contextlib.suppress(OSError):
                d.rmdir()


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ('' is the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


# --- the host's means ------------------------------------------------------------------------------------------
@dataclass
class Isolation:
    """What this host can enforce, found out once at start (``probe``) and reported by ``/health``."""

    settings: Settings
    accounts: bool  # each account runs as its own uid (else: all as the host's own user, development only)
    cgroups: Cgroups | None
    no_new_privs: bool  # setpriv found: no account process can gain privileges through a setuid binary
    _prepared: set[int] = field(default_factory=set)

    @classmethod
    def probe(cls, settings: Settings) -> Isolation:
        can_switch = os.geteuid() == 0 and settings.isolation != "off"
        if settings.isolation_required and not can_switch:
            raise RuntimeError(
                f"{env_name('environment')}={settings.environment}, {env_name('isolation')}={settings.isolation}: "
                "users' shells must run as accounts of their own, and this process cannot switch users. "
                "Run the tmux host as root (a container's root with Docker's default capabilities is enough); "
                f"only development may run without isolation ({env_name('isolation')}=off)."
            )
        cgroups = Cgroups.probe(subtree_name(settings)) if can_switch else None
        has_setpriv = shutil.which("setpriv") is not None
        if can_switch and not has_setpriv:
            raise RuntimeError("setpriv (util-linux) is needed to run shells as users' accounts: "
                               "apt-get install util-linux")
        iso = cls(settings, can_switch, cgroups, has_setpriv)
        if not can_switch:
            logger.warning(
                "ISOLATION OFF: every user's shell runs as this host's own OS user and can read its environment, "
                "its files and other users' sessions. Development only; run the host as root to isolate users.",
                extra={"isolation": iso.describe()},
            )
        return iso

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "enabled": self.accounts,
            "accounts": "a uid of its own per user" if self.accounts else "off: all shells run as the host's user",
            "cgroups": f"v{self.cgroups.version} (memory, pids)" if self.cgroups else None,
            "rlimits": {"nproc": s.user_max_processes, "nofile": s.user_max_open_files,
                        "fsize_mb": s.user_max_file_mb, "as_mb": None if self.cgroups else s.user_memory_mb},
            "memory_mb": s.user_memory_mb,
            "tmux_memory_mb": s.user_tmux_memory_mb,
            "oom_score_adj": s.shell_oom_score_adj,
            "no_new_privs": self.no_new_privs,
            "host_capabilities": capabilities(),
        }

    def account(self, number: int) -> Account:
        if number < 1:
            raise ValueError("account numbers start at 1")
        home = self.settings.resolved_home_dir / f"a{number}"
        if not self.accounts:
            return Account(number, os.getuid(), os.getgid(), home)
        uid = self.settings.account_uid_base + number
        return Account(number, uid, uid, home)

    def prepare(self, account: Account) -> None:
        """The account's home and cgroup (once per process; cheap to repeat)."""
        if account.number in self._prepared:
            return
        if self.accounts:
            with contextlib.suppress(KeyError):
                pw = pwd.getpwuid(account.uid)
                raise RuntimeError(f"uid {account.uid} belongs to system user {pw.pw_name!r}: choose another "
                                   f"{env_name('account_uid_base')}")
        root = self.settings.resolved_home_dir
        root.mkdir(parents=True, exist_ok=True)
        ensure_dir(root, 0o711)
        ensure_dir(account.home, 0o700, account.uid, account.gid)
        if self.cgroups is not None:
            self.cgroups.prepare(account, self.settings.user_memory_mb << 20, self.settings.user_max_processes)
        self._prepared.add(account.number)

    def env(self, account: Account, shell: str) -> dict[str, str]:
        """The environment of the account's tmux server and so of every shell: built from scratch."""
        return {
            "PATH": PATH, "HOME": str(account.home), "USER": account.name, "LOGNAME": account.name,
            "SHELL": shell, "LANG": "C.UTF-8", "TERM": "xterm-256color", **SHELL_HOOKS,
        }

    def spawn_kwargs(self, account: Account) -> dict[str, Any]:
        """Arguments for ``subprocess``/``asyncio`` with ``argv``."""
        return {"start_new_session": True, "cwd": str(account.home)}

    def argv(self, account: Account, command: list[str]) -> list[str]:
        """``command`` as the account, held until ``confine`` has run and a line is written to its stdin."""
        switch = [f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"] if self.accounts else []
        setpriv = ["setpriv", *switch, "--no-new-privs", "--"] if self.no_new_privs else []
        cgroups = [str(f) for f in self.cgroups.join_files(account)] if self.cgroups is not None else []
        return ["/bin/sh", "-c", _GO, "sh", *cgroups, "--", *setpriv, *command]

    def confine(self, account: Account, pid: int) -> None:
        """Put a process started by ``argv`` under the account's limits (before it is released)."""
        s = self.settings
        limits = [
            (resource.RLIMIT_NPROC, s.user_max_processes),
            (resource.RLIMIT_NOFILE, s.user_max_open_files),
            (resource.RLIMIT_FSIZE, s.user_max_file_mb << 20),
        ]
        if self.cgroups is None:  # no memory cgroup: bound each process instead
            limits.append((resource.RLIMIT_AS, s.user_memory_mb << 20))
        if self.accounts:  # (without accounts, RLIMIT_NPROC would count the developer's own processes too)
            for which, value in limits:
                resource.prlimit(pid, which, (value, value))
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(s.shell_oom_score_adj))

    def reap(self, account: Account) -> None:
        if self.cgroups is not None and self.accounts:
            self.cgroups.reap(account)
            self._prepared.discard(account.number)

    def memory_used(self, account: Account, server_pid: int | None) -> int | None:
        """Bytes the account's tmux server holds (its resident set)."""
        if server_pid is None:
            return None
        try:
            with open(f"/proc/{server_pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
