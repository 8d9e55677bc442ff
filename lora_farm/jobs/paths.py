"""Where a path in a spec points: relative to the YAML file, or (lora-scripts style) the cwd."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_UNSET_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


class PathProblem(ValueError):
    """A path value that cannot be resolved (e.g. it names an unset environment variable)."""


def expand(text: str) -> str:
    """Expand ``~`` and ``$VARS``; an unset variable is an error, not a literal ``$VAR``."""
    expanded = os.path.expandvars(text)
    leftover = _UNSET_VAR.search(expanded)
    if leftover:
        name = leftover.group(1) or leftover.group(2)
        raise PathProblem(f"uses the environment variable ${name}, which is not set, got {text!r}.")
    return os.path.expanduser(expanded)


def resolve_spec_path(raw: str, spec_dir: Path, cwd: Path, prefer_inside: Path | None = None
                      ) -> tuple[Path, str | None]:
    """Resolve ``raw`` as DESIGN.md says; returns the path and a note when the cwd was used.

    Relative paths resolve against the YAML file's folder. When nothing exists there but the path
    exists relative to the current directory (lora-scripts configs assume they run from the
    project root), that one is used. For outputs (nothing exists yet) ``prefer_inside`` picks the
    candidate inside the output root.
    """
    path = Path(expand(raw))
    if path.is_absolute():
        return path.resolve(), None
    beside_spec = (spec_dir / path).resolve()
    from_cwd = (cwd / path).resolve()
    if beside_spec.exists() or beside_spec == from_cwd:
        return beside_spec, None
    note = f"{raw!r} resolved against the current directory: {from_cwd} (nothing at {beside_spec})"
    if from_cwd.exists():
        return from_cwd, note
    if prefer_inside is not None and not is_inside(beside_spec, prefer_inside) and is_inside(
            from_cwd, prefer_inside):
        return from_cwd, note
    return beside_spec, None


def is_inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


_KINDS = ((stat.S_ISDIR, "is a folder"), (stat.S_ISCHR, "is a character device"),
          (stat.S_ISBLK, "is a block device"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
          (stat.S_ISSOCK, "is a socket"), (stat.S_ISREG, "is a file"))


def what_is(path: Path) -> str:
    """``"is a FIFO (named pipe)"``, ``"does not exist"`` ...: what ``path`` is, from its stat
    alone (never opened: opening a FIFO blocks, reading /dev/zero never ends)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if path.is_symlink() else "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    return next((kind for test, kind in _KINDS if test(mode)), "is not a file or folder")
