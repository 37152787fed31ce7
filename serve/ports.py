"""Is a TCP port free to listen on, and if not, who holds it (Linux: /proc/net/tcp* and /proc/*/fd).

`python -m serve run` checks its HTTP, gRPC and metrics ports before starting Ray: a second instance
on a busy port must fail at once, naming the port and its holder, instead of starting, failing to bind
somewhere inside Ray, and letting the first instance answer in its name.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
# Ray Serve's own defaults, for a Serve config that sets no port (the clients' and load tests' defaults too)
DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT = 8000, 9000


def url_host(host: str) -> str:
    """A host as a URL or a gRPC target names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something listens there (or on all interfaces).

    SO_REUSEADDR, as servers set it, so a closed connection lingering in TIME_WAIT does not count. "::" (all
    interfaces) on a machine without IPv6 (a Python built without it, a kernel booted with ipv6.disable=1): all its
    IPv4 interfaces, where gRPC listens there."""
    if ":" in host and not socket.has_ipv6:
        host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        if host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return port_in_use("0.0.0.0", port)
        raise
    return False


RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default min/max_worker_port


def ephemeral_ports(proc: Path = Path("/proc")) -> range:
    """The kernel's range for port-0 binds (where Ray's own servers land), Linux's default if unknown."""
    try:
        low, high = (proc / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A free port outside the kernel's ephemeral range and Ray's worker ports, not handed out before by this process.

    A port from a port-0 bind is free now but may be handed to one of Ray's own gRPC servers (raylet,
    agents) between this call and Serve's bind: the HTTP proxy then fails and the port answers in HTTP/2.
    Ports asked for together are only bound later, so a port is never handed out twice (two random picks
    among ~17,000 ports met in a CI run: "the HTTP and metrics ports are both 20581").
    """
    taken = ephemeral_ports()
    candidates = [p for p in range(20000, 65536) if p not in taken and p not in RAY_WORKER_PORTS]
    if not candidates:
        candidates = list(range(1024, 10000))
    for port in random.sample(candidates, min(tries, len(candidates))):
        if port not in _HANDED_OUT and not port_in_use(host, port):
            _HANDED_OUT.add(port)
            return port
    raise OSError(errno.EADDRINUSE, f"no free port outside {taken} after {tries} tries")


def listeners(port: int, proc: Path = Path("/proc")) -> list[str]:
    """Who listens on `port`: "pid 123 (python -m serve run ...)" per process found, or what is known."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return []
    holders = []
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue  # gone, or another user's process
        if _links(fds) & targets:
            holder = f"pid {pid_dir.name} ({_command(pid_dir)})"
            service = _serving_ancestor(pid_dir, proc)
            if service:
                holder += f", a process of the service pid {service} (python -m serve run)"
            holders.append(holder)
    return holders or ["a process this user cannot inspect (another user's, or in another container)"]


def _serving_ancestor(pid_dir: Path, proc: Path, most: int = 8) -> str | None:
    """The `python -m serve run` above a port's holder (Ray's proxy and agents are its launcher's grandchildren):
    the process to stop, where the holder's own pid names a Ray actor."""
    for _ in range(most):
        try:
            status = (pid_dir / "status").read_text()
        except OSError:
            return None
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "0")
        if parent in ("0", "1"):
            return None
        pid_dir = proc / parent
        if " -m serve run" in f" {_command(pid_dir)}":
            return parent
    return None


def _links(fds: list[Path]) -> set[str]:
    links = set()
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor, for one)
    return links


def _command(pid_dir: Path) -> str:
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    command = " ".join(a.decode(errors="replace") for a in argv if a)
    return command[:200] or "?"


REFUSED_BY_THE_SYSTEM = "cannot listen on the"


def busy_ports(wanted: dict[str, tuple[str, int]], in_use_too: bool = True) -> list[str]:
    """For each `name: (host, port)` that cannot be listened on, a line saying why: the port given twice, in
    use (naming its holder; not with `in_use_too` False: a check beside a running service), or refused by the
    system (an address not on this machine, a host name that does not resolve, a privileged port)."""
    problems = []
    names_by_port: dict[int, list[str]] = {}
    for name, (_, port) in wanted.items():
        names_by_port.setdefault(port, []).append(name)
    for port, names in names_by_port.items():
        if len(names) > 1:
            problems.append(f"the {' and '.join(names)} ports are both {port}: give each its own")
    for name, (host, port) in wanted.items():
        try:
            in_use = port_in_use(host, port)
        except OSError as exc:
            problems.append(f"{REFUSED_BY_THE_SYSTEM} {name} port {port} ({host}): {exc.strerror or exc}")
            continue
        if in_use and in_use_too:
            held_by = "; ".join(listeners(port)) or "unknown (no listener found in /proc)"
            problems.append(f"the {name} port {port} ({host}) is already in use, held by {held_by}")
    return problems
