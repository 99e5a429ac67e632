"""The `overlaylab` command that `pip install` gives: Fabric's own program over the package's
task collection (overlaylab.tasks), so it has the same tasks, options and help as `fab` in
a clone, and needs no fabfile."""

from __future__ import annotations

from fabric import Config, Executor
from fabric.main import Fab

from overlaylab import __version__
from overlaylab.tasks import ns

program = Fab(name="overlaylab", version=__version__, namespace=ns, executor_class=Executor, config_class=Config)


def main() -> None:
    program.run()
