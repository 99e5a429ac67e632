"""Unit tests (no host: facts built in memory, the peer lines as recorded on the lab after
a worker's power cut): the stale-peer fact and what verify and status say of it. The
e2e heal tests read the same from the lab's kernels (tests/e2e/healing.stale_peers)."""

from __future__ import annotations

from overlaylab import facts, peers, provision, render
from overlaylab.options import Options
from overlaylab.plan import Context, RunInput
from overlaylab.reasons import Seen
from overlaylab.repairs.stale_peers import StalePeers
from overlaylab.report import RunReport
from overlaylab.topology import Topology
from tests.unit.test_facts_render import inv, node

NID = "bdfa374594bb0000000000000000000000000000000000000000000000000000"
DROPIN = (
    render.MANAGED_MARK
    + "\n[Service]\nExecStart=\nExecStart=/usr/sbin/dockerd --cluster-store=consul://10.218.1.11:8500\n"
)

# bm-docker-02's sandbox, recorded: 10.218.9.6 still sent to bm-docker-03 (10.218.1.13),
# whose container at that address died in the power cut
RECORDED = """\
1-bdfa374594 neigh 10.218.9.6 02:42:0a:da:09:06
1-bdfa374594 neigh 10.218.9.2 02:42:0a:da:09:02
1-bdfa374594 neigh 10.218.9.3 02:42:0a:da:09:03
1-bdfa374594 fdb 02:42:0a:da:09:03 10.218.1.13
1-bdfa374594 fdb 02:42:0a:da:09:06 10.218.1.13
1-bdfa374594 fdb 02:42:0a:da:09:02 10.218.1.11
"""


def host(addr: str, serves: list[str], peer_lines: str = "", active: str = "active") -> facts.HostFacts:
    f = facts.HostFacts(docker_active=active, dropin=DROPIN, advertise_ips=[addr])
    containers = {f"c{n}": {"Name": f"c{n}", "IPv4Address": f"{ip}/24"} for n, ip in enumerate(serves)}
    f.network = {"Id": NID, "Containers": {**containers, "ep-0123": {"IPv4Address": "10.218.9.6/24"}}}
    f.peers = facts.parse_peers(peer_lines)
    return f


def test_the_recorded_sandbox_lines_give_each_peer_address_its_vtep() -> None:
    assert facts.parse_peers(RECORDED) == {
        "bdfa374594": {"10.218.9.6": "10.218.1.13", "10.218.9.2": "10.218.1.11", "10.218.9.3": "10.218.1.13"}
    }
    assert facts.parse_peers("garbage\n1-x fdb too few\n") == {}


def test_an_address_sent_to_a_host_that_runs_no_container_there_is_stale() -> None:
    """Another host's endpoint listed as ``ep-...`` (here at .6) is not the owner's own."""
    one = node("bm-docker-01", host("10.218.1.11", ["10.218.9.2"]), "manager")
    two = node("bm-docker-02", host("10.218.1.12", [], RECORDED))
    three = node("bm-docker-03", host("10.218.1.13", ["10.218.9.3"]))
    nodes = [one, two, three]
    assert peers.stale(two, nodes) == {"10.218.9.6": "bm-docker-03"}
    assert peers.stale(one, nodes) == {} and peers.stale(three, nodes) == {}
    problems = provision.unseen_problems(nodes)
    assert list(problems) == ["bm-docker-02"] and "10.218.9.6 to bm-docker-03" in problems["bm-docker-02"]
    # the repair the dockerd step and `fab status` read (repairs/stale_peers.py)
    inventory = inv(*(n.host for n in nodes))
    given = RunInput(inventory, Options(), Topology.of(inventory), tuple(n.name for n in nodes))
    view = Context(given, {n.name: n for n in nodes}, RunReport("status", [n.name for n in nodes]), dry=True)
    why = StalePeers(()).why(view, two, Seen())
    assert why is not None and why.startswith("its overlay still sends 10.218.9.6 to bm-docker-03"), why
    assert StalePeers(()).why(view, one, Seen()) is None


def test_entries_toward_a_host_whose_truth_is_not_known_are_left_alone() -> None:
    """Unreachable (not among the nodes), or its dockerd not running: its containers may run."""
    two = node("bm-docker-02", host("10.218.1.12", [], RECORDED))
    assert peers.stale(two, [two]) == {}
    stopped = node("bm-docker-03", host("10.218.1.13", [], active="failed"))
    assert peers.stale(two, [two, stopped]) == {}


def test_a_swarm_hosts_sandbox_is_not_judged() -> None:
    """Swarm mode's peers come from its network database, not from the legacy gossip events."""
    f = host("10.218.1.12", [], RECORDED)
    f.dropin = render.MANAGED_MARK + "\n[Service]\nExecStart=\nExecStart=/usr/sbin/dockerd --tlsverify\n"
    two, three = node("bm-docker-02", f), node("bm-docker-03", host("10.218.1.13", []))
    assert peers.stale(two, [two, three]) == {}


def test_a_failed_pair_whose_probe_address_one_host_sends_elsewhere_is_named_a_stale_entry() -> None:
    """verify's diagnosis, on what CI met in the HA module: bm-docker-02 still sends 10.218.9.6
    to bm-docker-03, and this round's probe on bm-docker-01 got that address; both directions
    of 01 <-> 02 fail because of 02's entry, not udp/4789. Where the probe got that address on
    03 itself, the entry is right and the pair falls back to the gossip hint."""
    from overlaylab.checks.verify import LIKELY_VXLAN, Matrix, diagnose

    nodes = [
        node("bm-docker-01", host("10.218.1.11", ["10.218.9.2"]), "manager"),
        node("bm-docker-02", host("10.218.1.12", [], RECORDED)),
        node("bm-docker-03", host("10.218.1.13", ["10.218.9.3"])),
    ]
    for n in nodes:
        n.facts.hostname = n.name
        n.facts.gossip_alive = [m.name for m in nodes if m is not n]
    matrix = Matrix([n.name for n in nodes], set())
    matrix.addresses = {"bm-docker-01": "10.218.9.6", "bm-docker-02": "10.218.9.7", "bm-docker-03": "10.218.9.8"}
    matrix.results = {
        ("bm-docker-01", "bm-docker-02", "ip"): (False, "100% packet loss"),
        ("bm-docker-02", "bm-docker-01", "name"): (False, "100% packet loss"),
        ("bm-docker-02", "bm-docker-03", "ip"): (True, ""),
    }
    hints = diagnose(matrix, nodes)
    assert set(hints) == {("bm-docker-01", "bm-docker-02"), ("bm-docker-02", "bm-docker-01")}
    for hint in hints.values():
        assert hint.startswith("bm-docker-02's overlay sends 10.218.9.6 (bm-docker-01's probe) to bm-docker-03")
        assert "re-run restarts bm-docker-02's dockerd" in hint
    matrix.addresses["bm-docker-03"] = "10.218.9.6"  # the address on the host the entry names: right
    matrix.results = {("bm-docker-02", "bm-docker-03", "ip"): (False, "100% packet loss")}
    assert diagnose(matrix, nodes) == {("bm-docker-02", "bm-docker-03"): LIKELY_VXLAN}
    assert matrix.as_dict()["addresses"] == matrix.addresses


def test_entries_toward_the_old_address_of_a_host_that_moved_are_named_only_by_the_run_that_saw_it() -> None:
    """bm-docker-03 moved from 10.218.1.13 to 10.218.1.43 and the run restarted it: bm-docker-02
    still sends .6 and .3 to the old address. stale() leaves them alone (toward no live host);
    toward_gone() names them from the run's ledger, and the peers step gives both reasons."""
    from overlaylab.steps.stale import MendPeers

    one = node("bm-docker-01", host("10.218.1.11", ["10.218.9.2"]), "manager")
    two = node("bm-docker-02", host("10.218.1.12", [], RECORDED))
    three = node("bm-docker-03", host("10.218.1.43", ["10.218.9.3", "10.218.9.6"], RECORDED))
    nodes = [one, two, three]
    gone = {"10.218.1.13": "bm-docker-03"}
    assert peers.stale(two, nodes) == {}
    assert peers.toward_gone(two, gone) == {"10.218.9.3": "10.218.1.13", "10.218.9.6": "10.218.1.13"}
    assert peers.toward_gone(two, {}) == {} and peers.toward_gone(one, gone) == {}
    assert peers.toward_gone(three, gone) == {}  # entries toward its own old address are not a peer's
    inventory = inv(*(n.host for n in nodes))
    given = RunInput(inventory, Options(), Topology.of(inventory), tuple(n.name for n in nodes))
    ctx = Context(given, {n.name: n for n in nodes}, RunReport("bootstrap-cluster", [n.name for n in nodes]), dry=False)
    ctx.ledger.gone.update(gone)
    why = MendPeers.stale(ctx, two, nodes)
    assert why is not None and why.startswith(
        "its overlay still sends 10.218.9.3 to bm-docker-03's old address 10.218.1.13, "
        "10.218.9.6 to bm-docker-03's old address 10.218.1.13, which that host no longer has"
    ), why
    assert MendPeers.stale(ctx, one, nodes) is None


def test_a_host_holding_entries_toward_a_moving_host_is_refused_before_the_run_without_allow_restart() -> None:
    """MendPeers.plan(): bm-docker-03 moved (dockerd advertises 10.218.1.13, eth1 has .43) and
    the run restarts it; bm-docker-02 sends its containers' addresses to .13 and runs a user's
    container: refused before anything changes, naming the entries; with --allow-restart, not.
    An old address a live host has now (given again) is no longer gone: nothing named."""
    from overlaylab.steps.stale import MendPeers

    one = node("bm-docker-01", host("10.218.1.11", ["10.218.9.2"]), "manager")
    two = node("bm-docker-02", host("10.218.1.12", [], RECORDED))
    two.facts.containers = {"users_app2": ""}  # a user's (no role label of ours)
    three = node("bm-docker-03", host("10.218.1.43", ["10.218.9.3", "10.218.9.6"]))
    three.facts.info = {"ClusterAdvertise": "10.218.1.13:2376"}
    nodes = [one, two, three]
    assert three.address_moved() is not None
    inventory = inv(*(n.host for n in nodes))
    for allow in (False, True):
        given = RunInput(inventory, Options(allow_restart=allow), Topology.of(inventory), tuple(n.name for n in nodes))
        ctx = Context(
            given, {n.name: n for n in nodes}, RunReport("bootstrap-cluster", [n.name for n in nodes]), dry=True
        )
        ctx.ledger.restarts["bm-docker-03"] = "its address moved"
        ctx.ledger.moved.add("bm-docker-03")
        planned = MendPeers().plan(ctx, two)
        assert planned is not None and planned.check
        if allow:
            assert planned.refusal is None
        else:
            assert planned.refusal is not None and planned.refusal.startswith(
                "its overlay still sends 10.218.9.3 to bm-docker-03's old address 10.218.1.13"
            ), planned.refusal
            assert planned.refusal.endswith("restarting dockerd stops users_app2; pass --allow-restart to go ahead")
        for_one = MendPeers().plan(ctx, one)  # no entry toward the old address: nothing certain
        assert for_one is not None and for_one.refusal is None
    # after the run: the old address given again to a live host is judged as any other
    ctx.ledger.gone["10.218.1.13"] = "bm-docker-03"
    again = node("bm-docker-04", host("10.218.1.13", ["10.218.9.3", "10.218.9.6"]))
    assert MendPeers.stale(ctx, two, [*nodes, again]) is None
    assert MendPeers.stale(ctx, two, nodes) is not None
