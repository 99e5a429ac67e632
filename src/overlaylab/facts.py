"""Read-only host facts, gathered in ONE remote command per host and parsed here.

A re-run with nothing to change should cost one round trip per host, so every
fact the plan needs comes from a single shell script whose sections are parsed
by small pure functions (unit-tested on recorded output).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DROPIN_DIR = "/etc/systemd/system/docker.service.d"
DROPIN = f"{DROPIN_DIR}/10-machine.conf"
BACKUP_DIR = "/var/lib/overlaylab/backup"
BACKUP = f"{BACKUP_DIR}/10-machine.conf"
# the users' containers held back over a restart of ours: "name policy" lines (steps/holdback.py)
HELD_FILE = "/var/lib/overlaylab/held-restart-policies"
BACKUP_ABSENT = f"{BACKUP_DIR}/10-machine.conf.absent"
ROLE_LABEL = "overlaylab.role"
ANCHOR_PREFIX = "overlaylab-anchor-"  # + the host: steps/anchor.py
PROBE_PREFIX = "olab-probe-"  # + the host and the run: checks/verify.py
MARK = "@@overlaylab:"
GOSSIP_PORT = 7946  # dockerd's gossip (serf), tcp and udp: ports.py lists it for the cluster
INFO_TIMEOUT = 20  # seconds `docker info` may take; 124: it did not answer (see mode.engine_problem)
CONSUL_KEY_FILE = "/etc/overlaylab/consul/gossip.json"  # HA mode's gossip key, root-only (steps/consul.py)
HOST_TLS = "/etc/overlaylab/tls"  # the docker API's TLS files, root-only (steps/tls.py)
HOST_CA, HOST_CERT, HOST_KEY = f"{HOST_TLS}/ca.pem", f"{HOST_TLS}/server.pem", f"{HOST_TLS}/server-key.pem"


@dataclass(frozen=True)
class Store:
    """Where the manager's facts look for Consul: its container, its volume, its HTTP port."""

    container: str
    volume: str
    port: int
    manager: bool = True  # the store the run reads: its volume and its leader too (HA: an agent's container only)
    server: bool = False  # HA mode's other servers: their leader is asked too (`fab status`, quorum)


# The Engine API on dockerd's own unix socket, where the host has curl: the docker CLI's
# answers for a fraction of its CPU (each CLI start costs ~40-70 ms of the host's CPU; a
# full read makes eight or more). Hosts without curl get the CLI, and the facts say which
# (the "via" section, `facts_via` in --json). -f: an HTTP error prints nothing, as the CLI's
# 2>/dev/null did; --max-time: as `timeout 20`.
DOCKER_SOCKET = "/var/run/docker.sock"
API_PRELUDE = (
    f"if command -v curl >/dev/null 2>&1 && [ -S {DOCKER_SOCKET} ]; then _api=1; else _api=; fi",
    # -q first: root's ~/.curlrc (-i, -L, --write-out) must not change what is read
    f'api() {{ curl -q -sf --max-time {INFO_TIMEOUT} --unix-socket {DOCKER_SOCKET} "http://docker$1"; }}',
)


def either(api: str, cli: str) -> str:
    """A section's command: the Engine API's where the script found curl, else the CLI's."""
    return f'if [ -n "$_api" ]; then {api}; else {cli}; fi'


def api_filters(**filters: str) -> str:
    """An Engine API list's `filters` query parameter, URL-encoded (`--filter k=v` of the CLI)."""
    return "filters=" + urllib.parse.quote(json.dumps({k: [v] for k, v in filters.items()}), safe="")


# When dockerd started (seconds since the epoch) and, for the TLS files of steps/tls.py,
# "path mtime base64" (the key: "path mtime -", its content is never read)
TLS_SCRIPT = (
    'p=$(systemctl show -p MainPID --value docker.service); t=$(ps -o etimes= -p "$p" 2>/dev/null | tr -d " "); '
    '[ -n "$t" ] && [ "$p" != 0 ] && echo "started $(( $(date +%s) - t ))"; '
    f'for f in {HOST_CA} {HOST_CERT}; do test -s $f && echo "$f $(stat -c %Y $f) $(base64 -w0 $f)"; done; '
    f'test -s {HOST_KEY} && echo "{HOST_KEY} $(stat -c %Y {HOST_KEY}) -"; true'
)

# all `fab verify` reads before its probes
VERIFY_SECTIONS = (
    "via",
    "hostname",
    "active",
    "addrs",
    "network",
    "gossip_events",
    "deaf_sandboxes",
    "peers",
    "dropin",
    "ping",
)


def attached_format(network: str) -> str:
    """`docker inspect` template, one tab-separated line per container: name, ID, running,
    then of its endpoint on the network it joined by that name: the network's ID, its
    aliases, its fixed IPv4 address if any; last the error of its last start."""
    return (
        "{{.Name}}\t{{.Id}}\t{{.State.Running}}\t{{with index .NetworkSettings.Networks "
        + json.dumps(network)
        + "}}{{.NetworkID}}\t{{range .Aliases}}{{.}},{{end}}\t{{with .IPAMConfig}}{{.IPv4Address}}{{end}}{{end}}"
        "\t{{.State.Error}}\t{{.HostConfig.RestartPolicy.Name}}:{{.HostConfig.RestartPolicy.MaximumRetryCount}}"
    ).replace("\\t", "\t")


@dataclass(frozen=True)
class Attachment:
    """A container on the network by its name, as its host's dockerd recorded it."""

    container_id: str
    network_id: str
    running: bool
    aliases: tuple[str, ...] = ()  # the user's: without the short ID dockerd adds itself
    ip: str = ""  # a fixed IPv4 address (`--ip`), kept when it is connected again
    error: str = ""  # why its last start failed
    policy: str = ""  # its restart policy as `docker update --restart` takes it: no, always, on-failure:3

    @property
    def comes_back(self) -> bool:
        """A dockerd restart starts it again, in the daemon's restore, before gossip is up:
        one that runs with a policy, or one with `always` even if stopped (Docker's rule)."""
        return (self.running and self.policy not in ("", "no")) or self.policy == "always"

    def failed_on(self, network_id: str) -> bool:
        """Its last start failed because that network was gone (a restart on a lost network)."""
        return network_id in self.error


def restart_policy(text: str) -> str:
    """`Name:MaximumRetryCount` from `docker inspect` as `docker update --restart` takes it."""
    kind, _, count = text.strip().partition(":")
    return f"{kind}:{count}" if kind == "on-failure" and count not in ("", "0") else kind


def parse_attached(text: str, network: str = "") -> dict[str, Attachment]:
    """attached_format's lines (the CLI), or one Engine API inspect object a line."""
    out = {}
    for line in text.splitlines():
        if line.startswith("{"):
            found = _attachment(_json(line), network)
            if found is not None:
                out[found[0]] = found[1]
            continue
        name, cid, running, net_id, aliases, ip, error, policy = ([*line.split("\t"), *[""] * 7])[:8]
        name = name.strip().lstrip("/")
        if name and net_id.strip():
            short = cid.strip()[:12]
            kept = tuple(a for a in aliases.split(",") if a and a != short)
            out[name] = Attachment(
                cid.strip(),
                net_id.strip(),
                running.strip() == "true",
                kept,
                ip.strip(),
                error.strip(),
                restart_policy(policy),
            )
    return out


def _attachment(inspect: Any, network: str) -> tuple[str, Attachment] | None:
    """What attached_format prints, read from the Engine API's inspect object."""
    if not isinstance(inspect, dict):
        return None
    endpoint = ((inspect.get("NetworkSettings") or {}).get("Networks") or {}).get(network) or {}
    name, cid = str(inspect.get("Name") or "").lstrip("/"), str(inspect.get("Id") or "")
    if not name or not endpoint.get("NetworkID"):
        return None
    state, policy = inspect.get("State") or {}, (inspect.get("HostConfig") or {}).get("RestartPolicy") or {}
    return name, Attachment(
        cid,
        str(endpoint["NetworkID"]),
        state.get("Running") is True,
        tuple(a for a in endpoint.get("Aliases") or [] if a and a != cid[:12]),
        str((endpoint.get("IPAMConfig") or {}).get("IPv4Address") or ""),
        str(state.get("Error") or ""),
        restart_policy(f"{policy.get('Name') or ''}:{policy.get('MaximumRetryCount') or 0}"),
    )


def store_leader_script(advertise: str, port: int) -> str:
    """Asks the manager's Consul for its leader over plain HTTP from bash (no curl on the
    hosts); where it serves HTTPS, gather.read_one asks through the admin's client. Only
    an answer tells a network the store lost from one it could not be asked about: dockerd
    says "No such network" in both cases."""
    q = shlex.quote
    return (
        f"a={q(advertise)}; case $a in *[!0-9.]*) a=$(ip -4 -o addr show dev $a 2>/dev/null | "
        "awk '{print $4; exit}'); a=${a%/*};; esac; "
        f'[ -n "$a" ] && timeout 3 bash -c "exec 3<>/dev/tcp/$a/{port} && '
        "printf 'GET /v1/status/leader HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3\" 2>/dev/null | "
        # a 200's body only: a Consul serving HTTPS answers plain HTTP with a 400 (storetls.py)
        "{ IFS= read -r status; case $status in *' 200 '*) tail -n 1;; esac; }"
    )


# After a power cut, dockerd 20.10 finds its overlay endpoints' state on disk but their
# namespaces gone with /run; the restore fails ("could not get network sandbox (oper true):
# failed get network namespace") and the error sticks to the network until the daemon
# restarts: no container of that host can join the overlay. A restart clears it (measured).
RESTORE_FAILED = "Failure during overlay endpoints restore"
RESTORE_FAILED_SCRIPT = (
    "pid=$(systemctl show -p MainPID --value docker.service); "
    f'[ "$pid" -gt 0 ] 2>/dev/null && journalctl _PID=$pid -o cat --no-pager -q | grep -c "{RESTORE_FAILED}"'
)

# Where each overlay sandbox's kernel sends a peer's address (overlaylab/peers.py):
# "<sandbox> neigh <IP> <MAC>" and "<sandbox> fdb <MAC> <VTEP>" lines, the sandbox named
# as in /run/docker/netns (<epoch>-<network ID, 10 chars>).
PEERS_SCRIPT = (
    'for f in /run/docker/netns/*-*; do [ -e "$f" ] || continue; n=${f##*/}; '
    'nsenter --net="$f" ip -4 neigh show nud permanent 2>/dev/null | '
    'awk -v n="$n" \'$2 == "dev" && $3 ~ /^vxlan/ && $4 == "lladdr" {print n, "neigh", $1, $5}\'; '
    'nsenter --net="$f" bridge fdb show 2>/dev/null | '
    'awk -v n="$n" \'$2 == "dev" && $3 ~ /^vxlan/ && $4 == "dst" {print n, "fdb", $1, $5}\'; done; true'
)


def parse_peers(text: str) -> dict[str, dict[str, str]]:
    """network ID (10 chars) -> {a peer's IPv4 address: the VTEP its MAC is sent to}."""
    macs: dict[str, dict[str, str]] = {}
    vteps: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4 or "-" not in parts[0]:
            continue
        nid = parts[0].partition("-")[2]
        if parts[1] == "neigh":
            macs.setdefault(nid, {})[parts[2]] = parts[3].lower()
        elif parts[1] == "fdb":
            vteps.setdefault(nid, {})[parts[2].lower()] = parts[3]
    return {
        nid: {ip: vteps[nid][mac] for ip, mac in found.items() if mac in vteps.get(nid, {})}
        for nid, found in macs.items()
    }


# The last gossip (serf) event this dockerd logged for each peer. dockerd joins one
# neighbour once and never rejoins by itself: a peer it last saw fail stays apart from
# it until serf's occasional reconnect (seen: 70 s after the manager's address came back).
GOSSIP_EVENTS_SCRIPT = (
    "pid=$(systemctl show -p MainPID --value docker.service); "
    '[ "$pid" -gt 0 ] 2>/dev/null && journalctl _PID=$pid -o cat --no-pager -q | '
    "grep -o 'serf: EventMember[A-Za-z]*: [^ ]* [0-9.]*' | awk '{s[$3]=$2\" \"$4} END {for (n in s) print n, s[n]}'"
)
GOSSIP_GONE = ("EventMemberFailed:", "EventMemberLeave:", "EventMemberReap:")


def gossip_last(events: str) -> dict[str, tuple[str, str]]:
    """peer -> (its last event, its address then), from GOSSIP_EVENTS_SCRIPT's output."""
    last = {}
    for line in events.splitlines():
        peer, event, address = ([*line.split(), "", ""])[:3]
        if peer and event:
            last[peer] = (event, address)
    return last


def gossip_alive(events: str) -> list[str]:
    """The peers whose last event is a join or an update: gossip reaches them."""
    return sorted(peer for peer, (event, _) in gossip_last(events).items() if event not in GOSSIP_GONE)


def gossip_gone(events: str) -> list[str]:
    """The peers whose last event is a failure or a leave."""
    return sorted(peer for peer, (event, _) in gossip_last(events).items() if event in GOSSIP_GONE)


def stray_threads_script(
    proc: str = "/proc",
    netns_dir: str = "/run/docker/netns",
    pid: str = "$(systemctl show -p MainPID --value docker.service)",
    between: str = "sleep 0.5",
) -> str:
    """Counts dockerd threads left in a deleted network namespace (see steps/anchor.py).

    A thread is stray when its namespace is neither the host's nor a live sandbox's. The
    host's is PID 1's, not that of dockerd's main thread: Go may run the overlay's
    watchMiss goroutine on the main thread, which then sits, locked, in a live sandbox,
    and measured against it every healthy thread looked stray (CI: "10 thread(s)" on a
    fresh worker whose daemon had 11, and a needless restart). A daemon with no thread
    in the host's namespace runs where this check does not apply: 0. A thread counts
    only if it is still stray after ``between`` (half a second): one that is tearing down a
    container's namespace at the moment of the first look is not a defect, and a restart
    for it would stop a user's containers for nothing. A healthy host pays no pause.
    """
    return (
        f'pid={pid}; if [ "$pid" -gt 0 ] 2>/dev/null; then host=$(readlink {proc}/1/ns/net); '
        "_stray() { "
        f"live=$(for f in {netns_dir}/*; do stat -L -c 'net:[%i]' \"$f\" 2>/dev/null; done); home=0; out=''; "
        f"for t in {proc}/$pid/task/*; do x=$(readlink $t/ns/net 2>/dev/null) || continue; "
        'if [ "$x" = "$host" ]; then home=1; continue; fi; '
        'echo "$live" | grep -qxF "$x" || out="$out ${t##*/}"; done; '
        "[ $home = 1 ] && echo $out; }; "
        f'a=$(_stray); if [ -n "$a" ]; then {between}; a=$(printf "%s\\n" $a $(_stray) | sort | uniq -d); fi; '
        'echo "$a" | grep -c . || true; fi'
    )


STACKS_DIR = "/var/run/docker"  # where dockerd 20.10 writes its goroutine stacks on SIGUSR1
# a goroutine blocked in a channel receive whose first frame is the datastore's watch: stopped
DEAD_WATCH_AWK = (
    r"/^goroutine [0-9]+ \[chan receive/ {h=1; next} "
    r"h && /datastore\.\(\*datastore\)\.Watch\.func1/ {n++} {h=0} END {print n+0}"
)


STACKS_WAIT = 4.0  # seconds the facts wait for dockerd's stack dump (it came within 0.1-0.2 s on the lab)
STACKS_WAIT_STEP = 10.0  # seconds the watches step waits, reading again a host whose dump did not come


def dead_watches_script(
    pid: str = "$(systemctl show -p MainPID --value docker.service)",
    stacks: str = STACKS_DIR,
    wait: float = STACKS_WAIT,
) -> str:
    """Counts a kv dockerd's store watches that stopped, from its own goroutine stacks
    (SIGUSR1 writes them to a file, read and removed here; dockerd logs one line).

    libnetwork's watch of a network's endpoints in the store ends at the first error
    Consul answers (a server restarting: "EOF", "No cluster leader"). It then waits, in a
    channel receive, for a discovery event to start it again (libnetwork datastore.Watch,
    RestartWatch); Consul 1.8 (measured) does not change dockerd's discovery keys on its heartbeats,
    so the event may never come, and the host never learns another container's name
    (steps/watches.py). A daemon without a cluster store: 0. One that gives no dump within
    ``wait`` seconds: "unknown", never a count (parse_dead_watches)."""
    return (
        f'pid={pid}; [ "$pid" -gt 0 ] 2>/dev/null && grep -qa -- --cluster-store= /proc/$pid/cmdline || '
        "{ echo 0; exit 0; }; "
        f"old=$(ls {stacks}/goroutine-stacks-*.log 2>/dev/null); kill -USR1 $pid || {{ echo unknown; exit 0; }}; f=''; "
        f"for _ in $(seq {round(wait * 10)}); do sleep 0.1; "
        f"n=$(ls -t {stacks}/goroutine-stacks-*.log 2>/dev/null | head -1); "
        '[ -s "$n" ] && ! echo "$old" | grep -qxF "$n" && { f=$n; break; }; done; '
        '[ -n "$f" ] || { echo unknown; exit 0; }; sleep 0.1; '
        f'awk {shlex.quote(DEAD_WATCH_AWK)} "$f"; '
        'rm -f "$f"'
    )


def parse_dead_watches(text: str) -> int | None:
    """The count dead_watches_script printed; None for "unknown", an empty or a garbled answer."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def deaf_sandboxes_script(
    proc: str = "/proc",
    netns_dir: str = "/run/docker/netns",
    pid: str = "$(systemctl show -p MainPID --value docker.service)",
    between: str = "sleep 0.5",
) -> str:
    """Names the overlay sandboxes (``<epoch>-<network ID, 10 chars>``) that no dockerd
    thread sits in: made while the daemon's gossip was not up yet.

    Docker 20.10's legacy overlay starts a sandbox's miss watcher (``watchMiss``, locked on
    a thread inside the sandbox, see steps/anchor.py) only if gossip is up when the sandbox
    is made (libnetwork ``initSandbox``). A dockerd restart brings containers with a
    restart policy back before that, so the host's sandbox never asks the cluster for a
    peer it did not see join; and those containers were announced with no VTEP in the
    daemon's peer table (``peerDBUpdateSelf`` edits a copy), which is what it answers
    other hosts' lookups with. Measured on the lab: after an agent host's dockerd restart
    in HA mode, its user's container neither reached nor was reached by any other host's,
    while fresh containers pinged each other. A sandbox is named only if it is still
    without a thread after ``between``: one made at the moment of the first look is not."""
    return (
        f'pid={pid}; if [ "$pid" -gt 0 ] 2>/dev/null; then '
        "_deaf() { "
        f"threads=$(for t in {proc}/$pid/task/*; do readlink $t/ns/net 2>/dev/null; done | sort -u); "
        f'for f in {netns_dir}/*-*; do [ -e "$f" ] || continue; '
        "i=$(stat -L -c 'net:[%i]' \"$f\" 2>/dev/null) || continue; "
        'echo "$threads" | grep -qxF "$i" || echo "${f##*/}"; done; }; '
        f'a=$(_deaf); if [ -n "$a" ]; then {between}; a=$(printf "%s\\n" $a $(_deaf) | sort | uniq -d); fi; '
        'echo "$a"; fi'
    )


@dataclass(frozen=True)
class Socket:
    """A listening socket on one of the cluster's ports, from `ss -Hlntup`."""

    proto: str  # tcp | udp
    address: str
    port: int
    process: str = ""  # "" for the kernel's own (a VXLAN device's UDP socket)
    pid: int = 0

    def holder(self) -> str:
        return f"{self.process} (PID {self.pid})" if self.process else "the kernel (a VXLAN device)"

    def on(self, addresses: Iterable[str]) -> bool:
        """Listening on one of these addresses, or on every address."""
        return self.address in WILDCARD or self.address in addresses


WILDCARD = ("0.0.0.0", "*", "::", "")  # as `ss` prints an address that is every address


SS_USER = re.compile(r'\(\("([^"]*)",pid=(\d+)')


def parse_sockets(text: str) -> list[Socket]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] not in ("tcp", "udp"):
            continue
        address, _, port = parts[4].rpartition(":")
        if not port.isdigit():
            continue
        address = address.partition("%")[0]  # `0.0.0.0%eth1`: bound to an interface, every address on it
        user = SS_USER.search(line)
        out.append(
            Socket(parts[0], address.strip("[]"), int(port), user[1] if user else "", int(user[2]) if user else 0)
        )
    return out


def parse_disk(text: str) -> dict[str, int]:
    """mount point -> free KiB, from `df -Pk`."""
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[3].isdigit():
            out[" ".join(parts[5:])] = int(parts[3])
    return out


def sections(output: str) -> dict[str, str]:
    out: dict[str, str] = {}
    name = None
    buf: list[str] = []
    for line in output.splitlines():
        if line.startswith(MARK):
            if name is not None:
                out[name] = "\n".join(buf).strip("\n")
            name, buf = line[len(MARK) :].strip(), []
        else:
            buf.append(line)
    return out


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", text.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def exec_start(unit_text: str) -> str | None:
    """The effective ExecStart of `systemctl cat` output: later files override, `ExecStart=` resets."""
    value: str | None = None
    section = ""
    pending = ""
    for raw in unit_text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        stripped = line.strip()
        if stripped.startswith("# /"):
            section = ""
            continue
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped
            continue
        if section == "[Service]" and stripped.startswith("ExecStart="):
            value = stripped[len("ExecStart=") :].strip() or None
    return value


def addresses(addrs_json: str, advertise: str) -> list[str]:
    """IPv4 addresses behind the advertise setting: an interface name, or an IP the host has."""
    links = _json(addrs_json) or []
    found = []
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and advertise in (link.get("ifname"), info["local"]):
                found.append(info["local"])
    return found


@dataclass
class HostFacts:
    """What one host looks like now. Parsing never fails: missing parts are None/empty."""

    hostname: str = ""
    facts_via: str = ""  # "api": dockerd's answers read from its Engine API by curl; "cli": by the docker CLI
    docker_active: str = ""
    docker_pid: int = 0
    exec_start: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    info_error: str = ""
    dropin: str | None = None
    backup: list[str] = field(default_factory=list)
    backup_content: str | None = None  # the original drop-in overlaylab kept, if there was one
    binary_version: str = ""  # `dockerd --version`: the engine's version also while it is stopped
    daemon_json: dict[str, Any] | None = None
    daemon_json_error: str = ""
    advertise_ips: list[str] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)  # running name -> our role label
    stopped: dict[str, str] = field(default_factory=dict)  # created or exited name -> our role label
    consul: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    gossip: bool = False
    consul_backend: bool = False
    services: int = 0
    overlays: list[str] = field(default_factory=list)
    stray_threads: int = 0
    dead_watches: int | None = 0  # dockerd's store watches that stopped (steps/watches.py); None: unknown
    held: dict[str, str] = field(default_factory=dict)  # a stopped run's held-back containers -> policy
    deaf_sandboxes: list[str] = field(default_factory=list)  # network IDs (10 chars): no miss watcher
    peers: dict[str, dict[str, str]] = field(default_factory=dict)  # network ID (10) -> peer IP -> VTEP sent to
    attached: dict[str, Attachment] = field(default_factory=dict)  # container (any state) -> its endpoint's record
    consul_volume: bool = False  # the manager: Consul's data volume exists
    gossip_key: str = ""  # a digest of HA mode's gossip key file; "" none
    store_leader: str = ""  # the manager: Consul's leader as Consul said it while the facts were read; "" no answer
    restore_failed: bool = False  # this dockerd's overlay restore failed at its start
    gossip_gone: list[str] = field(default_factory=list)  # peers (hostnames) this dockerd last saw fail or leave
    gossip_alive: list[str] = field(default_factory=list)  # peers (hostnames) it last saw join
    sockets: list[Socket] = field(default_factory=list)  # listening on the cluster's ports
    kernel_release: str = ""
    vxlan: str = ""  # loaded | loadable | missing; "" not read
    disk: dict[str, int] = field(default_factory=dict)  # mount point -> free KiB
    images: set[str] | None = None  # repository:tag; None: not read (recorded facts from before the section)
    default_route: bool | None = None  # None: not read
    host_ping: str | None = None  # `ping -V`'s first line (iputils'); None: not read
    docker_started: int = 0  # when the running dockerd started, seconds since the epoch; 0: not running or not read
    tls_files: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (mtime, PEM in base64; key: "-")

    @property
    def can_pull(self) -> bool:
        """A registry may be reachable: a default route, a proxy, or a registry mirror. Read
        from the host alone: asking a registry would be a pull's traffic, and on the lab's
        isolated hosts traffic that must not leave the machine."""
        mirrors = (self.info.get("RegistryConfig") or {}).get("Mirrors")
        proxy = self.info.get("HttpProxy") or self.info.get("HttpsProxy")
        return self.default_route is not False or bool(mirrors) or bool(proxy)

    @property
    def data_root(self) -> str:
        return str(self.info.get("DockerRootDir") or "/var/lib/docker")

    def free_kib(self, path: str) -> tuple[str, int] | None:
        """The mount that holds ``path`` and its free KiB (the longest mount point that is a prefix)."""
        mounts = [m for m in self.disk if path == m or path.startswith(m.rstrip("/") + "/")]
        if not mounts:
            return None
        mount = max(mounts, key=len)
        return mount, self.disk[mount]

    def has_image(self, image: str) -> bool:
        name = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
        return self.images is None or name in self.images or f"docker.io/{name}" in self.images

    @property
    def version(self) -> str:
        if self.info.get("ServerVersion"):
            return str(self.info["ServerVersion"])
        match = re.match(r"Docker version (\S+?),", self.binary_version)
        return match[1] if match else ""

    @property
    def version_tuple(self) -> tuple[int, int, int] | None:
        return parse_version(self.version)

    @property
    def gossip_left_behind(self) -> str:
        """The address dockerd's gossip listens on, where the host no longer has it (its
        cluster address moved: dockerd resolved it once, at its start), else ""."""
        held = (s for s in self.sockets if (s.proto, s.port, s.process) == ("tcp", GOSSIP_PORT, "dockerd"))
        return next((s.address for s in held if not s.on(self.advertise_ips)), "")

    @property
    def info_stalled(self) -> bool:
        return self.info_error.endswith("exited 124")

    @property
    def cluster_store(self) -> str:
        return str(self.info.get("ClusterStore") or "")

    @property
    def cluster_advertise(self) -> str:
        return str(self.info.get("ClusterAdvertise") or "")

    @property
    def swarm_state(self) -> str:
        return str((self.info.get("Swarm") or {}).get("LocalNodeState") or "inactive")

    @property
    def swarm_manager(self) -> bool:
        return bool((self.info.get("Swarm") or {}).get("ControlAvailable"))

    @property
    def swarm_cluster_id(self) -> str:
        return str(((self.info.get("Swarm") or {}).get("Cluster") or {}).get("ID") or "")

    @property
    def swarm_remote_managers(self) -> list[str]:
        """`ip:port` of the managers this node knows."""
        return [str(m.get("Addr", "")) for m in (self.info.get("Swarm") or {}).get("RemoteManagers") or []]

    @property
    def foreign_containers(self) -> list[str]:
        return sorted(name for name, role in self.containers.items() if not role)


# ---- the table: each fact's section of the script, its command and its parser ----------


@dataclass(frozen=True)
class Where:
    """What a host's script is written for: its advertise setting (an interface or an IP),
    the Consul container it looks for, the overlay network, the ports it asks about."""

    advertise: str
    store: Store | None = None
    network: str = ""
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fact:
    """One section of the facts script: its name, its shell command for a host (run under
    sudo, in parallel with the others, its failure its own), and how its output is read
    into the host's facts. A section not asked for is not parsed: its fields keep their
    defaults."""

    name: str
    command: Callable[[Where], str]
    parse: Callable[[HostFacts, str, Where], None]


def into(attr: str, read: Callable[[str], Any]) -> Callable[[HostFacts, str, Where], None]:
    """A parser that sets one field from the section's text."""
    return lambda facts, text, _: setattr(facts, attr, read(text))


def number(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def first(text: str) -> Any:
    """The first element of `docker inspect`'s JSON list, or the Engine API's object, or None."""
    found = _json(text)
    if isinstance(found, dict):
        return found
    return found[0] if isinstance(found, list) and found else None


def _names(text: str, key: str) -> list[str]:
    """A key of each object of an Engine API list (networks' names, images' tags)."""
    found = _json(text)
    if not isinstance(found, list):
        return []
    values = [item.get(key) for item in found if isinstance(item, dict)]
    return [str(v) for value in values for v in (value if isinstance(value, list) else [value]) if v]


def _info(facts: HostFacts, text: str, _: Where) -> None:
    info = _json(text)
    if isinstance(info, dict):
        facts.info = info
    else:
        facts.info_error = text.strip()[-300:]


def _dropin(facts: HostFacts, text: str, _: Where) -> None:
    lines = text.split("\n")
    if lines[0].strip() == "present":
        facts.dropin = base64.b64decode(lines[1].strip() if len(lines) > 1 else "").decode(errors="replace")


def _backup_content(text: str) -> str | None:
    kept = text.strip()
    return base64.b64decode(kept).decode(errors="replace") if kept else None


def _daemon_json(facts: HostFacts, text: str, _: Where) -> None:
    if text.strip():
        parsed = _json(text)
        if isinstance(parsed, dict):
            facts.daemon_json = parsed
        else:
            facts.daemon_json_error = "not valid JSON"


def _containers(facts: HostFacts, text: str, _: Where) -> None:
    if text.lstrip().startswith("["):  # the Engine API's list
        listed = _json(text)
        for c in listed if isinstance(listed, list) else []:
            names = [str(n) for n in c.get("Names") or []]
            name = next((n[1:] for n in names if n.count("/") == 1), "")  # not a link's /other/alias
            running = c.get("State") in ("running", "restarting")
            (facts.containers if running else facts.stopped)[name] = str((c.get("Labels") or {}).get(ROLE_LABEL) or "")
        return
    for line in text.splitlines():
        if line.strip():
            name, role, state = ([*line.split("\t"), "", ""])[:3]
            running = state.strip() in ("", "running", "restarting")  # recorded output has no state
            (facts.containers if running else facts.stopped)[name.strip()] = role.strip()


def _kernel(facts: HostFacts, text: str, _: Where) -> None:
    facts.kernel_release, facts.vxlan = [*text.split(), "", ""][:2]


def _gossip_events(facts: HostFacts, text: str, _: Where) -> None:
    facts.gossip_gone, facts.gossip_alive = gossip_gone(text), gossip_alive(text)


def _tls(facts: HostFacts, text: str, _: Where) -> None:
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["started"] and len(parts) == 2 and parts[1].isdigit():
            facts.docker_started = int(parts[1])
        elif len(parts) == 3 and parts[0].startswith(HOST_TLS + "/") and parts[1].isdigit():
            facts.tls_files[parts[0]] = (int(parts[1]), parts[2])


def _consul_command(w: Where) -> str:
    if not w.store:
        return "true"
    name = shlex.quote(w.store.container)
    return either(f"api /containers/{name}/json", f"timeout 20 docker inspect {name} 2>/dev/null")


def _volume_command(w: Where) -> str:
    if w.store is None or not w.store.manager:
        return "true"
    name = shlex.quote(w.store.volume)
    return either(
        f"api /volumes/{name} >/dev/null && echo {name}", f"docker volume inspect -f '{{{{.Name}}}}' {name} 2>/dev/null"
    )


def _leader_command(w: Where) -> str:
    """Only our own Consul is asked: whatever else holds the port is none of the facts' business."""
    store = w.store
    if store is None or not (store.manager or store.server):
        return "true"
    name = shlex.quote(store.container)
    running = either(
        f"api /containers/{name}/json | grep -q '\"Running\":true'",
        f"docker inspect -f '{{{{.State.Running}}}}' {name} 2>/dev/null | grep -qx true",
    )
    return f"{{ {running}; }} && {{ {store_leader_script(w.advertise, store.port)}; }}; echo"


def _attached_command(w: Where) -> str:
    """The containers on the network by its name (the filter matches the name a container was
    attached by, also once the store lost it), each inspected."""
    net = shlex.quote(w.network)
    listed = f"api '/containers/json?all=1&{api_filters(network=w.network)}'"
    ids = f'{listed} | grep -o \'{{"Id":"[0-9a-f]\\{{64\\}}"\' | cut -d\'"\' -f4'  # each entry's own, not a label
    deadline = f"end=$(( $(date +%s) + {INFO_TIMEOUT} ))"  # as the CLI's: what answered within it
    return either(
        f'{deadline}; for id in $({ids}); do [ "$(date +%s)" -lt "$end" ] || break; '
        "api /containers/$id/json; echo; done",
        f"timeout 20 docker ps -aq --filter network={net} | xargs -r timeout 20 "
        f"docker inspect -f {shlex.quote(attached_format(w.network))} 2>/dev/null",
    )


def _listening_command(w: Where) -> str:
    wanted = shlex.quote("( " + " or ".join(f"sport = :{p}" for p in w.ports) + " )")
    return f"ss -Hlntup {wanted} 2>/dev/null"


def fixed(command: str) -> Callable[[Where], str]:
    return lambda _: command


FACTS: tuple[Fact, ...] = (
    Fact("via", fixed('[ -n "$_api" ] && echo api || echo cli'), into("facts_via", str.strip)),
    Fact("hostname", fixed("hostname"), into("hostname", str.strip)),
    Fact("active", fixed("systemctl is-active docker.service 2>&1"), into("docker_active", str.strip)),
    Fact("mainpid", fixed("systemctl show -p MainPID --value docker.service 2>&1"), into("docker_pid", number)),
    Fact("unit", fixed("systemctl cat docker.service 2>&1"), into("exec_start", exec_start)),
    Fact(
        "info",
        fixed(
            either(  # curl's timeout (28) said as timeout's (124): mode.engine_problem
                'api /info || { rc=$?; [ "$rc" = 28 ] && rc=124; [ "$rc" = 7 ] && rc="7 (nothing answers on '
                f'{DOCKER_SOCKET})"; echo "docker info exited $rc"; }}',
                f"timeout {INFO_TIMEOUT} docker info --format '{{{{json .}}}}' 2>&1 || echo \"docker info exited $?\"",
            )
        ),
        _info,
    ),
    Fact("dropin", fixed(f"test -e {DROPIN} && {{ echo present; base64 -w0 {DROPIN}; echo; }}"), _dropin),
    Fact("backup", fixed(f"ls {BACKUP_DIR} 2>/dev/null"), into("backup", str.split)),
    Fact(
        "backup_content",
        fixed(f"test -e {BACKUP} && base64 -w0 {BACKUP}; echo"),
        into("backup_content", _backup_content),
    ),
    # the costliest calls (~0.1 s of CPU each) only where their answer is not known otherwise:
    # a running dockerd tells its version in `docker info`
    Fact(
        "binary_version",
        fixed("systemctl is-active -q docker.service || dockerd --version 2>/dev/null"),
        into("binary_version", str.strip),
    ),
    Fact("daemon_json", fixed("cat /etc/docker/daemon.json 2>/dev/null"), _daemon_json),
    Fact(
        "addrs",
        lambda w: f"ip -j -4 addr show dev {shlex.quote(w.advertise)} 2>/dev/null || ip -j -4 addr 2>/dev/null",
        lambda facts, text, w: setattr(facts, "advertise_ips", addresses(text, w.advertise)),
    ),
    Fact(
        "containers",
        fixed(
            either(
                "api '/containers/json?all=1'",
                "timeout 20 docker ps -a --format '{{.Names}}\t{{.Label \""
                + ROLE_LABEL
                + "\"}}\t{{.State}}' 2>/dev/null",
            )
        ),
        _containers,
    ),
    Fact("consul", _consul_command, into("consul", first)),
    Fact("consul_volume", _volume_command, into("consul_volume", lambda t: bool(t.strip()))),
    # HA mode's gossip key: a digest, to compare between hosts; the key itself is never read here
    Fact(
        "gossip_key",
        fixed(f"test -s {CONSUL_KEY_FILE} && sha256sum {CONSUL_KEY_FILE} | cut -c1-16"),
        into("gossip_key", str.strip),
    ),
    Fact("store_leader", _leader_command, into("store_leader", lambda t: t.strip().strip('"'))),
    Fact(
        "network",
        lambda w: either(
            f"api /networks/{shlex.quote(w.network)}",
            f"timeout 20 docker network inspect {shlex.quote(w.network)} 2>/dev/null",
        ),
        into("network", first),
    ),
    Fact(
        "attached",
        _attached_command,
        lambda facts, text, w: setattr(facts, "attached", parse_attached(text, w.network)),
    ),
    Fact("gossip", fixed(f"ss -Hltn 'sport = :{GOSSIP_PORT}' 2>/dev/null"), into("gossip", lambda t: bool(t.strip()))),
    Fact(
        "consul_backend",
        # a dockerd running with a cluster store in our drop-in has the backend
        fixed(
            f"grep -qs -- --cluster-store= {DROPIN} && systemctl is-active -q docker.service && echo yes || "
            '{ d=$(command -v dockerd || echo /usr/sbin/dockerd); grep -q -a libkv/store/consul "$d" && echo yes; }'
        ),
        into("consul_backend", lambda t: t.strip() == "yes"),
    ),
    # no swarm state at the default data root: no services (elsewhere, or in a swarm: ask)
    Fact(
        "services",
        fixed(
            'if [ -d /var/lib/docker/swarm ] && [ -z "$(ls -A /var/lib/docker/swarm)" ]; then echo 0; '
            "else timeout 20 docker service ls -q 2>/dev/null | wc -l; fi"
        ),
        into("services", number),
    ),
    Fact("stray_threads", fixed(stray_threads_script()), into("stray_threads", number)),
    Fact("dead_watches", fixed(dead_watches_script()), into("dead_watches", parse_dead_watches)),
    Fact(
        "deaf_sandboxes",
        fixed(deaf_sandboxes_script()),
        into("deaf_sandboxes", lambda t: sorted({n.partition("-")[2] for n in t.split() if "-" in n})),
    ),
    Fact("peers", fixed(PEERS_SCRIPT), into("peers", parse_peers)),
    Fact(
        "held",
        fixed(f"cat {HELD_FILE} 2>/dev/null"),
        into("held", lambda t: dict(line.split(None, 1) for line in t.splitlines() if len(line.split()) == 2)),
    ),
    Fact("tls", fixed(TLS_SCRIPT), _tls),
    Fact("restore_failed", fixed(RESTORE_FAILED_SCRIPT), into("restore_failed", lambda t: number(t) > 0)),
    Fact("gossip_events", fixed(GOSSIP_EVENTS_SCRIPT), _gossip_events),
    Fact(
        "overlays",
        fixed(
            either(
                f"api '/networks?{api_filters(driver='overlay')}'",
                "timeout 20 docker network ls --filter driver=overlay --format '{{.Name}}' 2>/dev/null",
            )
        ),
        into("overlays", lambda t: _names(t, "Name") if t.lstrip().startswith("[") else t.split()),
    ),
    # preflight: who holds the cluster's ports, the kernel's VXLAN, free space, the images there
    Fact("listening", _listening_command, into("sockets", parse_sockets)),
    Fact(
        "kernel",
        fixed(
            "uname -r; if [ -d /sys/module/vxlan ]; then echo loaded; "
            "elif modprobe -n vxlan >/dev/null 2>&1; then echo loadable; else echo missing; fi"
        ),
        _kernel,
    ),
    Fact("disk", fixed("df -Pk 2>/dev/null"), into("disk", parse_disk)),
    # verify's full-size check forbids fragmenting (-M do), which only iputils' ping can
    Fact("ping", fixed("ping -V 2>&1 | head -n 1"), into("host_ping", str.strip)),
    Fact(
        "images",
        fixed(either("api /images/json", "timeout 20 docker images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null")),
        into("images", lambda t: set(_names(t, "RepoTags") if t.lstrip().startswith("[") else t.split())),
    ),
    Fact(
        "route",
        fixed("ip -4 route show default 2>/dev/null; ip -6 route show default 2>/dev/null"),
        into("default_route", lambda t: bool(t.strip())),
    ),
)


def script(
    advertise: str,
    store: Store | None,
    network: str,
    ports: tuple[int, ...] = (),
    only: tuple[str, ...] | None = None,
) -> str:
    """The facts script; runs under sudo. Each section may fail without stopping the rest.

    The sections run at once, each into a file of its own, and are printed in order: a
    no-op re-run waits for the slowest docker call, not the sum of ~15 (1.1 s -> see bench/).
    ``only`` names the sections a task needs: each docker call costs ~0.07 s of the host's
    CPU, which at 12 hosts on a small machine is seconds (`fab verify` reads three)."""
    where = Where(advertise, store, network, ports)
    chosen = [f for f in FACTS if only is None or f.name in only]
    run = [f'( {f.command(where)} ) > "$_o/{n}" &' for n, f in enumerate(chosen)]
    show = [f"echo '{MARK}{f.name}'; cat \"$_o/{n}\"" for n, f in enumerate(chosen)]
    return "\n".join(
        ["export LC_ALL=C", *API_PRELUDE, "_o=$(mktemp -d)", *run, "wait", *show, f"echo '{MARK}end'", 'rm -rf "$_o"']
    )


def parse(output: str, advertise: str, network: str = "") -> HostFacts:
    """The script's output read back, section by section; a section that is not there keeps
    its fields' defaults (parsing never fails)."""
    sec = sections(output)
    facts = HostFacts()
    where = Where(advertise, network=network)
    for fact in FACTS:
        if fact.name in sec:
            fact.parse(facts, sec[fact.name], where)
    return facts
