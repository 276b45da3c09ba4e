"""The committed bench artefacts stay artefacts: every JSON under bench/results/ says which command wrote it (so every
figure the README quotes from one can be reproduced) and holds no path of the machine that ran it; and the helpers
the benches write them with keep a previous file whole when a write fails."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

RESULTS = sorted((REPO_ROOT / "bench" / "results").glob("*.json"))
# An absolute path of some machine: /work/..., /tmp/..., /home/..., C:\..., anywhere in a string.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|tmp|home|root|Users|mnt|var|private|scratch|opt|data)/|[A-Z]:\\")


@pytest.fixture
def recipe_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import recipe_runs

    return recipe_runs


def strings(value) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        return [*value, *(s for item in value.values() for s in strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def test_there_are_results():
    assert {path.name for path in RESULTS} >= {"baselines.json", "fidelity.json", "load_memory.json"}


@pytest.mark.parametrize("path", RESULTS, ids=lambda path: path.name)
def test_every_result_names_the_bench_command_that_wrote_it(path):
    results = json.loads(path.read_text())
    commands = results.get("commands") or [results.get("command")]
    assert commands and all(isinstance(command, str) for command in commands), f"{path.name} records no command"
    for command in commands:
        words = shlex.split(command)
        assert words[:1] == ["python"] and words[1].startswith("bench/"), command
        assert (REPO_ROOT / words[1]).is_file(), f"{path.name}: {words[1]} does not exist"


@pytest.mark.parametrize("path", RESULTS, ids=lambda path: path.name)
def test_no_result_holds_a_path_of_the_machine_that_ran_it(path):
    found = [s for s in strings(json.loads(path.read_text())) if s.startswith("/") or MACHINE_PATH.search(s)]
    assert not found, f"{path.name} holds machine paths: {found[:3]}"


def test_portable_path_keeps_no_directory_of_this_machine(recipe_runs, tmp_path):
    root = recipe_runs.ROOT
    assert recipe_runs.portable_path(str(root / "bench" / "results" / "x.json")) == "bench/results/x.json"
    assert recipe_runs.portable_path(str(root.parent / "shared" / "data" / "a.json")) == "../shared/data/a.json"
    assert recipe_runs.portable_path(f"data.path={root.parent}/shared/a.json") == "data.path=../shared/a.json"
    elsewhere = recipe_runs.portable_path(f"--out={tmp_path}/b.json")  # a temporary directory: the name alone
    assert elsewhere == "--out=b.json" or elsewhere.startswith("--out=~/") and elsewhere.endswith("/b.json")
    assert recipe_runs.portable_path(str(Path.home() / ".cache" / "m")) == "~/.cache/m"
    for unchanged in ("recipes/7b.yaml", "train.lr=1e-3", "--steps", "1e-2"):
        assert recipe_runs.portable_path(unchanged) == unchanged


def test_portable_path_keeps_a_linked_shared_directory_beside_the_repository(recipe_runs, tmp_path, monkeypatch):
    """../shared is often a symbolic link (to a data disk): a path through it is still ../shared/..."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "data-disk").mkdir()
    (tmp_path / "shared").symlink_to(tmp_path / "data-disk", target_is_directory=True)
    monkeypatch.setattr(recipe_runs, "ROOT", tmp_path / "repo")
    assert recipe_runs.portable_path(str(tmp_path / "shared" / "data" / "a.json")) == "../shared/data/a.json"


def test_command_line_is_what_a_user_types_from_the_repository(recipe_runs, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "bench" / "baselines.py"), "--out",
                                      str(REPO_ROOT / "bench" / "results" / "b.json"), "--lrs", "1e-3,3e-3"])
    assert recipe_runs.command_line() == "python bench/baselines.py --out bench/results/b.json --lrs 1e-3,3e-3"


def test_a_failed_write_leaves_the_previous_results_whole(recipe_runs, tmp_path):
    out = tmp_path / "results.json"
    recipe_runs.write_json(out, {"runs": [1]})
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written as UTF-8: the write fails midway
        with recipe_runs.atomic_target(out) as temporary:
            temporary.write_text("{\"runs\": [\ud800")
    assert json.loads(out.read_text()) == {"runs": [1]}
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_a_corrupt_results_file_is_refused_in_one_line(recipe_runs, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("{\"runs\": [")
    with pytest.raises(SystemExit) as refused:
        recipe_runs.read_results(out)
    error = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and str(out) in error and "\n" not in error
