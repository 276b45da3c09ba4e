"""scripts/setup.sh's choice of PyTorch, run against a stand-in venv whose python records what pip is asked for:
with no torch installed, both a pinned set-up and a refresh to the newest releases (`NOLA_CONSTRAINTS=none`, what
`make refresh-constraints` runs) install constraints.txt's torch release, never the index's newest (a CUDA build
on a CPU-only machine), and hold it while the rest is resolved."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO_ROOT

STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "{log}"
if [ "$*" = "-c import torch" ]; then exit 1; fi     # no torch in the venv yet
if [[ "$*" == *"torch.__version__.split"* ]]; then echo {release}; fi   # what it then installed
exit 0
"""


@pytest.mark.parametrize("constraints", ["constraints.txt", "none"])
def test_set_up_installs_the_pinned_torch_release_and_holds_it(tmp_path, constraints):
    pinned = re.search(r"^torch==\S+$", (REPO_ROOT / "constraints.txt").read_text(), re.MULTILINE).group(0)
    log = tmp_path / "pip.log"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(STAND_IN.format(log=log, release=pinned.removeprefix("torch==")))
    (venv / "bin" / "python").chmod(0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # no NVIDIA driver, whatever this machine has
    (tools / "nvidia-smi").chmod(0o755)
    environment = {**os.environ, "NOLA_VENV": str(venv), "NOLA_CONSTRAINTS": constraints,
                   "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("NOLA_CPU_TORCH", None)
    subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO_ROOT, env=environment, check=True, capture_output=True)
    installs = [line for line in log.read_text().splitlines() if " install " in f" {line} "]
    assert installs[0].endswith(f"install {pinned}"), installs  # torch first, at the tested release
    assert installs[-1].endswith("-e .[dev]") and "-c" in installs[-1].split(), installs
    assert pinned in (venv / ".nola-constraints.txt").read_text().splitlines()  # held while the rest resolves
