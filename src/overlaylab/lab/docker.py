"""The outer Docker engine, driven through its CLI.

The CLI is already on every machine that runs a lab and speaks every API version
we meet, so it beats adding an SDK dependency for a few dozen calls.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import IO, Any

from overlaylab.errors import CommandError


@dataclass(frozen=True)
class Docker:
    """One engine, addressed by its socket."""

    socket: str

    def argv(self, *args: str) -> list[str]:
        return ["docker", "-H", f"unix://{self.socket}", *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        stdin: IO[bytes] | None = None,
        timeout: float | None = 600,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*args)
        proc = subprocess.run(
            argv,
            input=input,
            stdin=stdin if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, out, err)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def out(self, *args: str, **kwargs: Any) -> str:
        return self.run(*args, **kwargs).stdout.strip()

    def inspect(self, kind: str, name: str) -> dict[str, Any] | None:
        """`docker KIND inspect`, or None when the object does not exist."""
        proc = self.run(kind, "inspect", name, check=False)
        if proc.returncode != 0:
            return None
        data: list[dict[str, Any]] = json.loads(proc.stdout)
        return data[0] if data else None

    def ids(self, kind: str, label: str) -> list[str]:
        """Names of containers, volumes or networks carrying a label."""
        fmt = "{{.Name}}" if kind in ("volume", "network") else "{{.Names}}"
        extra = ["-a"] if kind == "container" else []
        listing = self.out(kind, "ls", *extra, "--filter", f"label={label}", "--format", fmt)
        return sorted(line for line in listing.splitlines() if line)

    def ping(self) -> bool:
        try:
            return self.run("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False
