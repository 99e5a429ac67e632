"""The dry run's promise, as one check that the unit and the end-to-end tests share.

A dry run says two kinds of change: certain ones ("changed": the plan, from facts) and
conditional ones ("may change", each with its condition: what no fact read before the
run can foretell, plan.Maybe). The run must then make every certain change, and no
change that was neither certain nor conditional: its changes minus the conditional ones
are exactly the certain ones. The same holds for dockerd restarts (`restarts`, and
`may_restart`), and a certain restart keeps its reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Hosts = Mapping[str, Mapping[str, Mapping[str, str]]]  # host -> step -> {"status", "detail"}


def check(dry: Mapping[str, Any], real: Mapping[str, Any], left_out: tuple[str, ...] = ()) -> None:
    """``dry`` and ``real``: the two runs' JSON documents (RunReport.document); ``left_out``:
    steps not compared (the unit tests stub the ping matrix out of the run)."""

    def keyed(hosts: Hosts, *statuses: str) -> set[tuple[str, str]]:
        return {
            (h, step)
            for h, steps in hosts.items()
            for step, o in steps.items()
            if o["status"] in statuses and step not in left_out
        }

    certain, conditional = keyed(dry["hosts"], "changed"), keyed(dry["hosts"], "may change")
    done = keyed(real["hosts"], "changed")
    assert done - conditional == certain, {
        "planned, not done": sorted(certain - done),
        "done, not planned, not conditional": sorted(done - certain - conditional),
    }
    every = keyed(dry["hosts"], "changed", "ok", "failed", "skipped")
    assert every - conditional == keyed(real["hosts"], "changed", "ok", "failed", "skipped") - conditional, (
        "the steps said on each host differ",
        sorted(every ^ keyed(real["hosts"], "changed", "ok", "failed", "skipped")),
    )
    planned, may, restarted = dry["restarts"], dry["may_restart"], real["restarts"]
    assert set(planned) <= set(restarted) <= set(planned) | set(may), (planned, may, restarted)
    assert {h: restarted[h] for h in planned if h not in may} == {h: planned[h] for h in planned if h not in may}
