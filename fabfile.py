"""A clone's `fab`: the tasks of the installed `overlaylab` command (overlaylab.tasks),
with the lab's inventory kept beside this file (inventory/lab.yaml), wherever `fab` runs."""

from __future__ import annotations

from pathlib import Path

from invoke.collection import Collection

from overlaylab import tasks

ns = Collection(*tasks.ns.tasks.values())  # a copy: the installed command's stays as it is
ns.configure({"overlaylab": {"lab_inventory": str(Path(__file__).resolve().parent / "inventory" / "lab.yaml")}})
