"""A run's options, as the tasks take them: typed, frozen, read by the run and its steps."""

from __future__ import annotations

from dataclasses import dataclass

from overlaylab.cluster import MAX_PARALLEL


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    json: bool = False
    accept_new_host_keys: bool = False
    force_leave_swarm: bool = False
    leave_other_swarm: bool = False
    allow_restart: bool = False
    reissue_certs: bool = False  # a new CA, and a new certificate for every host (tls)
    remove_ca: bool = False  # teardown: the CA on this machine goes too
    sudo_password: str | None = None
    parallel: int = MAX_PARALLEL  # hosts worked on at once
