"""The dry run's promise, as one check that the unit and the end-to-end tests share.

A dry run says two kinds of change: certain ones ("changed": the plan, from facts) and
conditional ones ("may change", each with its condition: what no fact read before the
run can foretell, plan.Maybe). The run must then make every certain change, and no
change that was neither certain nor conditional: its changes minus the conditional ones
are exactly the certain ones. The same holds for dockerd restarts (`restarts`, and
`may_restart`), and a certain restart keeps its reason (a later restart of the same host,
the peers step's, is said after it: plan.add_restart). Every outcome counts, not only a
step's last on a host (a step may act twice: the store's TLS rounds, the peers passes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check(dry: Mapping[str, Any], real: Mapping[str, Any], left_out: tuple[str, ...] = ()) -> None:
    """``dry`` and ``real``: the two runs' JSON documents (RunReport.document); ``left_out``:
    steps not compared (the unit tests stub the ping matrix out of the run)."""

    def keyed(doc: Mapping[str, Any], *statuses: str) -> set[tuple[str, str]]:
        return {
            (o["host"], o["step"])
            for o in doc["outcomes"]
            if (not statuses or o["status"] in statuses) and o["step"] not in left_out
        }

    certain, conditional = keyed(dry, "changed"), keyed(dry, "may change")
    done = keyed(real, "changed")
    assert done - conditional == certain, {
        "planned, not done": sorted(certain - done),
        "done, not planned, not conditional": sorted(done - certain - conditional),
    }
    said = keyed(dry) - conditional
    assert said == keyed(real) - conditional, ("the steps said on each host differ", sorted(said ^ keyed(real)))
    planned, may, restarted = dry["restarts"], dry["may_restart"], real["restarts"]
    assert set(planned) <= set(restarted) <= set(planned) | set(may), (planned, may, restarted)
    kept = {h: restarted[h][: len(why)] for h, why in planned.items()}
    assert kept == planned, ("a certain restart's reason changed", planned, restarted)
