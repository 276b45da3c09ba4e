"""The adapter store: a directory of nola adapter directories, each served under its subdirectory's name.

Training's `adapter/` directory and the compact `--format nola` export both belong here as they are. A name comes
from a request, so it is treated as hostile: it must be one plain path component of a small alphabet, and the
directory it names must lie inside the store once every link is followed. For such a request nothing outside the
store is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE
from nola.errors import NolaError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNotFound(NolaError):
    """No adapter of that name in the store: a server answers 404."""


class BadAdapter(NolaError):
    """An adapter that cannot be served as asked (a name that leaves the store, a damaged file, another base, a rank
    above the server's): a server answers 400."""


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise NolaError(f"--adapters: {root} is not a directory")
        self.root = root.resolve()

    def names(self) -> list[str]:
        """Every name the store serves, sorted: subdirectories with a servable name, inside the store, holding an
        adapter_config.json."""
        return sorted(entry.name for entry in self.root.iterdir()
                      if NAME_PATTERN.fullmatch(entry.name) and self._inside(entry)
                      and (entry / CONFIG_FILE).is_file())

    def directory(self, name: str) -> Path:
        """The adapter directory served as `name`; BadAdapter for a name that is not one plain component or leads
        outside the store, AdapterNotFound for one the store lacks."""
        if not NAME_PATTERN.fullmatch(name):
            raise BadAdapter(f"adapter {name!r}: not an adapter name (one path component of letters, digits, "
                             f"'.', '_' and '-', starting with a letter or digit)")
        candidate = self.root / name
        for path in (candidate, candidate / CONFIG_FILE, candidate / WEIGHTS_FILE):  # before any link is followed
            if os.path.lexists(path) and not self._inside(path):
                raise BadAdapter(f"adapter {name!r}: leads outside the adapter store")
        if not (candidate / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"adapter {name!r}: not in the adapter store")
        return candidate.resolve()

    def _inside(self, path: Path) -> bool:
        resolved = path.resolve()
        return resolved != self.root and resolved.is_relative_to(self.root)
