"""Write the exact versions of everything `nola[EXTRAS]` needs, as installed in this Python, to a pip constraints
file (default: constraints.txt).

Why a closure and not `pip freeze`: set-up's venv sees the system's site-packages (so a user's CUDA torch counts),
and a freeze would pin whatever else that system holds. Only the packages nola's requirements reach, transitively,
with their environment markers evaluated here, are written; nola itself is not.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions `scripts/setup.sh` installs (pip -c): the tree the whole suite last passed on.
# Written by `python scripts/freeze_constraints.py`; refresh to the newest releases with `make refresh-constraints`
# (a fresh venv, unconstrained, frozen here, then the whole suite on it). pyproject.toml keeps the ranges.
"""


def requirement_closure(root: str, extras: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of every distribution `root[extras]` requires, transitively."""
    found: dict[str, str] = {}
    pending = [(root, frozenset(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        name, wanted_extras = pending.pop()
        if (name, wanted_extras) in seen:
            continue
        seen.add((name, wanted_extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"freeze_constraints: {name} is required but not installed in {sys.prefix}")
        if canonicalize_name(name) != canonicalize_name(root):
            found[canonicalize_name(name)] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(
                    requirement.marker.evaluate({**default_environment(), "extra": extra})
                    for extra in (wanted_extras or {""})):
                continue
            if canonicalize_name(requirement.name) == canonicalize_name(root):  # nola[dev] -> nola[peft]
                pending.append((root, frozenset(requirement.extras)))
                continue
            pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="dev", help="comma-separated extras of nola to include (default: dev)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "constraints.txt")
    arguments = parser.parse_args(argv)
    closure = requirement_closure("nola", [e for e in arguments.extras.split(",") if e])
    # a local version label (+cpu, +cu124) names one build: pin the release, and let set-up pick the build
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(closure.items())]
    staging = arguments.out.with_name(arguments.out.name + ".tmp")
    staging.write_text(HEADER + "\n".join(lines) + "\n")
    staging.replace(arguments.out)
    print(f"{arguments.out}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
