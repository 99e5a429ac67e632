"""The path MTU between the hosts: the largest packet each path carries whole.

Why: the overlay adds 50 bytes (VXLAN) to every packet, so a path that cannot carry the
overlay's MTU plus 50 passes every small ping and hangs TCP at its first full-size segment
(moby/libnetwork#2661; cloud underlays of 1450 bytes, VPNs, GRE tunnels). Measured with the
hosts' own don't-fragment pings (iputils' `-M do`) of each other's cluster addresses, at a
ladder of sizes sent in one round, all at once, not one size after another; a size counts
if one of three tries comes back (a lost packet is not a smaller path), and a size that
comes back at once is not tried again: on a healthy path the round takes one round trip. ICMP between
the hosts works on a running cluster too, where the port probe's UDP cannot be used.
"""

from __future__ import annotations

from overlaylab.cluster import Node, parallel
from overlaylab.steps.network import DEFAULT_MTU, VXLAN_OVERHEAD

ICMP_HEADERS = 28  # IPv4 (20) and ICMP (8): a ping's payload is the packet's size less these
STEPS = (1500, 1450, 1400, 1350, 1300, 1200, 1000, 576)  # IP total lengths tried below the need
SMALLEST = 576  # the smallest MTU an IPv4 host must take; network.mtu's floor


def ladder(needed: int) -> tuple[int, ...]:
    """The sizes tried, largest first: what the overlay needs (its MTU plus VXLAN's 50), and
    the steps below 1500 (which name what would fit); above 1500, the need alone."""
    return tuple(sorted({needed, *STEPS}, reverse=True))


def script(source_ip: str, peers: list[tuple[str, str]], sizes: tuple[int, ...]) -> str:
    """Every size to every peer at once, from the host's cluster address: prints
    `M host size` for each size that came back. For a POSIX shell or bash."""
    parts = [
        f"( for try in 1 2 3; do ping -n -q -M do -c 1 -W 1 -I {source_ip} -s {size - ICMP_HEADERS} {ip} "
        f">/dev/null 2>&1 && {{ echo 'M {host} {size}'; break; }}; sleep 0.2; done ) &"
        for host, ip in peers
        for size in sizes
    ]
    return "\n".join([*parts, "wait"])


def parse(output: str, peers: list[str]) -> dict[str, int]:
    """host -> the largest size that came back (0: none did, the path is down or ICMP is blocked)."""
    found = dict.fromkeys(peers, 0)
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "M" and parts[1] in found and parts[2].isdigit():
            found[parts[1]] = max(found[parts[1]], int(parts[2]))
    return found


def fits(path: int) -> int:
    """The largest network.mtu a path of this size carries."""
    return path - VXLAN_OVERHEAD


def too_narrow(source: str, target: str, path: int, mtu: int) -> str | None:
    """Why the path from source to target cannot carry the overlay of this MTU; None if it can
    (or if nothing came back at all: a down path or blocked ICMP is not a size, and the port
    probe and verify name those)."""
    if path == 0 or path >= mtu + VXLAN_OVERHEAD:
        return None
    fit = fits(path)
    advice = f"set network.mtu to {fit}" if fit >= SMALLEST else f"no overlay MTU of at least {SMALLEST} fits"
    return (
        f"{source} -> {target}: the path carries packets of at most {path} bytes (don't-fragment pings of the "
        f"cluster addresses), the overlay needs {mtu + VXLAN_OVERHEAD} (its MTU {mtu} plus VXLAN's "
        f"{VXLAN_OVERHEAD}): {advice}, or raise the underlay's MTU"
    )


def link_command(address: str) -> str:
    """Prints `I mtu` for the interface that holds the host's cluster address."""
    return (
        f"dev=$(ip -o -4 addr show to {address} 2>/dev/null | awk '{{print $2; exit}}'); "
        'echo "I $(cat /sys/class/net/"$dev"/mtu 2>/dev/null)"'
    )


def parse_link(output: str) -> int:
    """The interface's MTU from link_command's line (0: not read)."""
    found = next((line.split()[1:] for line in output.splitlines() if line.startswith("I ")), [])
    return int(found[0]) if found and found[0].isdigit() else 0


def measure(nodes: list[Node], mtu: int) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """`fab status`'s round, one command a host: the path MTU from each host to every other,
    and the MTU of the interface that holds each host's cluster address."""
    paths: dict[str, dict[str, int]] = {}
    links: dict[str, int] = {}
    sizes = ladder(mtu + VXLAN_OVERHEAD)

    def one(node: Node) -> None:
        peers = [(o.name, o.advertise_ip) for o in nodes if o is not node and o.advertise_ip]
        out = node.sh(link_command(node.advertise_ip) + "\n" + script(node.advertise_ip, peers, sizes), check=False)
        paths[node.name] = parse(out, [name for name, _ in peers])
        links[node.name] = parse_link(out)

    parallel([n for n in nodes if n.advertise_ip], one)
    return paths, links


def narrowest(paths: dict[str, int]) -> tuple[str, int] | None:
    """The narrowest path measured from a host: (toward, size); None if none answered."""
    answered = [(size, host) for host, size in paths.items() if size]
    return (min(answered)[1], min(answered)[0]) if answered else None


AUTO_CEILING = 9000  # network.mtu: auto tries up to jumbo frames' size
DEFAULT_AUTO = DEFAULT_MTU


def choose(paths: dict[str, dict[str, int]]) -> tuple[int | None, list[str]]:
    """network.mtu: auto: the largest MTU every measured path carries, and why; or None and
    the refusals (a path nothing came back on cannot be sized; one under 576 + 50 fits none)."""
    silent = [
        f"{src} -> {dst}: no don't-fragment ping came back (ICMP blocked, or the path down): network.mtu: auto "
        "cannot size it; set network.mtu to a number"
        for src, found in sorted(paths.items())
        for dst, size in sorted(found.items())
        if size == 0
    ]
    if silent:
        return None, silent
    sizes = sorted((size, src, dst) for src, found in paths.items() for dst, size in found.items())
    if not sizes:
        return DEFAULT_AUTO, [f"network.mtu auto: {DEFAULT_AUTO}, Docker's own (one host: no path to measure)"]
    size, src, dst = sizes[0]
    if fits(size) < SMALLEST:
        return None, [
            f"{a} -> {b}: the path carries packets of at most {n} bytes: no overlay MTU of at least {SMALLEST} "
            "fits (network.mtu: auto); raise the underlay's MTU"
            for n, a, b in sizes
            if fits(n) < SMALLEST
        ]
    return fits(size), [
        f"network.mtu auto: {fits(size)}, the largest every path carries (the narrowest, {src} -> {dst}, "
        f"carries {size} bytes, less VXLAN's {VXLAN_OVERHEAD})"
    ]
