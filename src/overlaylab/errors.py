"""One exception root, so the CLI maps every failure to an exit code in one place."""

from __future__ import annotations


class OverlaylabError(Exception):
    """Base of every error overlaylab raises on purpose."""

    exit_code = 1


class InputError(OverlaylabError):
    """Bad input or a refused precondition: nothing was touched yet (exit 2)."""

    exit_code = 2


class CommandError(OverlaylabError):
    """A command failed; keeps the command and its output for the report."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip()).splitlines()[-5:]
        super().__init__(f"`{' '.join(argv)}` exited {returncode}: " + " | ".join(tail))
