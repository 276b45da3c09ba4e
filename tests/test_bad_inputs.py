"""Every user mistake gets one line: a table of bad inputs across recipes, overrides, data, checkpoints, adapters and
the flags of every command, each run through the real entry point's main() and checked for exit code 2, a single
`error:` line naming the problem and its place, no traceback, and nothing written.

In-process (main(argv) with the session's embedded cache) rather than one subprocess per case: the same code path
at a fraction of the start-up cost."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

import pytest

from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from nola.errors import NolaError
from nola.training.run_lock import acquire_run_lock
from tests.conftest import REPO_ROOT, entry_point, run_train, tiny_llama

TINY = str(REPO_ROOT / "recipes" / "tiny.yaml")
QUIET = ["train.sample_generations=0", "log.wandb_mode=disabled", "train.max_steps=2", "train.save_steps=2",
         "train.eval_steps=2"]


@pytest.fixture(scope="module")
def files(cache_dir, tmp_path_factory):
    """The bad files the table refers to, and one good checkpoint and adapter to spoil."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "good-run"
    run_train(cache_dir, TINY, *QUIET, f"train.output_dir={run}")
    write = {
        "not_yaml.yaml": "train:\n  max_steps: 3\n   lr: [\n",
        "a_list.yaml": "- train\n- model\n",
        "typo.yaml": "train:\n  max_stpes: 3\n",
        "wrong_type.yaml": "train:\n  max_steps: ten\n",
        "broken.json": '[{"instruction": "a", "output": "b"},\n {"instruction": \n',
        "no_output.json": json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]),
        "numbers.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": 7, "output": "b"}\n',
        "empty_outputs.json": json.dumps([{"instruction": f"q{i}", "output": ""} for i in range(300)]),
        "data.csv": "instruction,output\na,b\n",
        "bad_mmlu.json": json.dumps([{"input": "Q", "output": "E"}]),
        "a_file.txt": "not a directory\n",
    }
    for name, text in write.items():
        (root / name).write_text(text)
    # Saved as latin-1, not UTF-8: "é" is the lone byte 0xe9 on line 2.
    (root / "latin1.json").write_bytes('[{"instruction": "a", "output": "b"},\n {"instruction": "é", "output": "b"}]'
                                       .encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"instruction": "a", "output": "b"}\n{"instruction": "é", "output": "b"}\n'
                                        .encode("latin-1"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": f"q{i}", "output": "a"} for i in range(300)]),
                   root / "whole.parquet")
    whole = (root / "whole.parquet").read_bytes()
    (root / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (root / "random.parquet").write_bytes(bytes(range(256)) * 4)
    (root / "no_config").mkdir()
    (root / "not_a_checkpoint").mkdir()
    damaged = root / "damaged"
    shutil.copytree(run / "checkpoints" / "step-2", damaged)
    (damaged / "optimizer.safetensors").write_bytes(b"garbage")
    old_generator = root / "old-generator"
    shutil.copytree(run / "adapter", old_generator)
    description = json.loads((old_generator / CONFIG_FILE).read_text())
    description["generator_version"] = "torch-manual-seed-v0"
    (old_generator / CONFIG_FILE).write_text(json.dumps(description))
    wrong_hash = root / "wrong-hash"
    shutil.copytree(run / "adapter", wrong_hash)
    (wrong_hash / WEIGHTS_FILE).write_bytes((wrong_hash / WEIGHTS_FILE).read_bytes()[:-8] + b"\0" * 8)
    assert file_sha256(wrong_hash / WEIGHTS_FILE) != description["weights_sha256"]
    tiny_llama().save_pretrained(root / "other-base")
    pickled = root / "pickled-base"  # a checkpoint with .bin weights only: nola must never unpickle it
    pickled.mkdir()
    shutil.copy(root / "other-base" / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    escaping = root / "escaping"
    shutil.copytree(run / "checkpoints" / "step-2", escaping)
    manifest = json.loads((escaping / "manifest.json").read_text())
    manifest["../../etc/hostname"] = {"bytes": 1, "sha256": "0"}
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "run": run, "checkpoint": run / "checkpoints" / "step-2", "adapter": run / "adapter"}


TRAIN_CASES = [
    # recipe files
    (["{root}/missing.yaml"], "missing.yaml: no such recipe file"),
    (["{root}/not_yaml.yaml"], "not_yaml.yaml: line 3 not valid YAML"),
    (["{root}/a_list.yaml"], "a_list.yaml: a recipe must be a mapping of sections"),
    (["{root}/typo.yaml"], "unknown key 'train.max_stpes' (did you mean 'train.max_steps'?)"),
    (["{root}/wrong_type.yaml"], "wrong_type.yaml: train.max_steps must be int, got 'ten'"),
    # overrides
    ([TINY, "max_steps"], "override 'max_steps': expected dotted.key=value"),
    ([TINY, "trainer.lr=1"], "unknown key 'trainer.lr' (did you mean 'train.lr'?)"),
    ([TINY, "train.lr=0"], "train.lr must be > 0, got 0.0"),
    ([TINY, "train.lr=fast"], "train.lr must be float, got 'fast'"),
    ([TINY, "adapter.rank=0"], "adapter.rank: must be an integer >= 1"),
    ([TINY, "adapter.num_basis=0"], "adapter.num_basis: must be an integer >= 1"),
    ([TINY, "adapter.method=dora"], "adapter.method: 'dora' is not one of nola, lora, vera"),
    ([TINY, "adapter.method=vera", "adapter.quant_bits=4"], "adapter.quant_bits is for method nola"),
    ([TINY, "adapter.seed=3"], "adapter.seed is derived, not set: use train.seed"),
    ([TINY, "adapter.init=pissa"], "adapter.init must be one of 'random', 'svd', got 'pissa'"),
    ([TINY, "adapter.freeze_a=sometimes"], "adapter.freeze_a must be bool, got 'sometimes'"),
    ([TINY, "adapter.init=svd"], "adapter.init: svd is for method lora: nola's A is a seeded random matrix"),
    ([TINY, "adapter.freeze_a=true"], "adapter.freeze_a: true is for method lora"),
    ([TINY, "adapter.method=lora", "adapter.init=svd", "adapter.rank=4096"], "adapter.rank: 4096 exceeds the "
                                                                             "smaller side of model.layers.0"),
    ([TINY, "data.source_max_len=0"], "data.source_max_len must be > 0"),
    ([TINY, "data.target_max_len=-5"], "data.target_max_len must be > 0"),
    ([TINY, "train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    ([TINY, "train.max_nonfinite_steps=0"], "train.max_nonfinite_steps must be >= 1"),
    ([TINY, "data.split_seed=-1"], "data.split_seed must be >= 0"),
    ([TINY, "train.deferred_projection=maybe"], "train.deferred_projection must be bool, got 'maybe'"),
    ([TINY, "mmlu.shots=9"], "mmlu.shots must be in [0, 5]"),
    ([TINY, "log.wandb_mode=cloud"], "log.wandb_mode must be one of 'offline', 'online', 'disabled'"),
    # data
    ([TINY, "data.path={root}/missing.json"], "data.path: no such data file"),
    ([TINY, "data.path={root}/broken.json"], "broken.json: line 3: not valid JSON"),
    ([TINY, "data.path={root}/no_output.json"], "no_output.json: record 2: missing key 'output'"),
    ([TINY, "data.path={root}/numbers.jsonl"], "numbers.jsonl: line 2: 'instruction' must be a string, got int"),
    ([TINY, "data.path={root}/empty_outputs.json"], "has no usable training record (300 read, 300 without a response"),
    ([TINY, "data.path={root}/data.csv"], "data.csv: unsupported data file type '.csv'"),
    ([TINY, "data.path={root}/latin1.json"], "latin1.json: line 2: not UTF-8 text (byte 0xe9 at offset 56)"),
    ([TINY, "data.path={root}/latin1.jsonl"], "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9 at offset 53)"),
    ([TINY, "data.path={root}/truncated.parquet"], "truncated.parquet: not a readable Parquet file (Parquet magic"),
    ([TINY, "data.path={root}/random.parquet"], "random.parquet: not a readable Parquet file (Parquet magic"),
    ([TINY, "mmlu.path={root}/bad_mmlu.json"], "bad_mmlu.json: record 1: 'output' must be one of A, B, C, D"),
    # model and adapter layout
    ([TINY, "model.name_or_path={root}/missing-model"], "model.name_or_path: no such directory"),
    ([TINY, "model.name_or_path={root}/no_config"], "no_config has no config.json (not a transformers checkpoint)"),
    ([TINY, "model.name_or_path={root}/pickled-base"], "pickled-base: only PyTorch .bin weights (pickles, which nola "
                                                       "never loads)"),
    ([TINY, "adapter.target_modules=[attention]"], "adapter.target_modules: ['attention'] matches no Linear layer"),
    # checkpoints
    ([TINY, "train.resume_from={root}/nowhere"], "train.resume_from: '{root}/nowhere' is not 'auto', null or a"),
    ([TINY, "train.resume_from={root}/not_a_checkpoint"], "not_a_checkpoint: not a checkpoint (manifest.json is"),
    ([TINY, "train.resume_from={root}/damaged"], "damaged: checkpoint file optimizer.safetensors is missing or corr"),
    ([TINY, "train.resume_from={root}/escaping"], "entry '../../etc/hostname' points outside the checkpoint"),
    ([TINY, "train.resume_from={checkpoint}", "adapter.rank=4"], "was trained with adapter.rank=8, this recipe has 4"),
    ([TINY, "train.resume_from={checkpoint}", "train.seed=1"], "was trained with train.seed=0, this recipe has 1"),
    ([TINY, "train.resume_from={checkpoint}", "train.micro_batch_size=2"], "global_batch=8, this run has global_bat"),
    # output directory
    ([TINY, "train.output_dir={root}/a_file.txt"], "train.output_dir: {root}/a_file.txt is a file, not a directory"),
    ([TINY, "train.output_dir={root}/a_file.txt/run"], "cannot create {root}/a_file.txt/run: {root}/a_file.txt is a"),
]

SCRIPT_CASES = [
    ("merge_and_export", ["--format", "hf", "--bits", "4"], "--bits: quantised coefficients are a nola-format option"),
    ("merge_and_export", ["--format", "hf", "--adapter", "{root}/old-generator"], "basis generator 'torch-manual-"),
    ("merge_and_export", ["--format", "hf", "--adapter", "{root}/wrong-hash"], "corrupted or truncated (SHA-256"),
    ("merge_and_export", ["--format", "hf", "--base", "{root}/other-base"], "adapter is for another base model"),
    ("merge_and_export", ["--format", "nola", "--out", "{adapter}"], "overlaps --adapter"),
    ("merge_and_export", ["--format", "hf", "--check-prompts", "-1"], "--check-prompts: must be >= 0"),
    ("generate", ["--prompts-file", "{root}/missing.txt"], "--prompts-file: no such file"),
    ("generate", ["--prompt", "hi", "--top-p", "0"], "--top-p in (0, 1]"),
    ("evaluate", ["--mmlu", "{root}/bad_mmlu.json"], "bad_mmlu.json: record 1: 'output' must be one of A, B, C, D"),
    ("evaluate", ["--data", "{root}/missing.json"], "--data: no such file"),
    ("evaluate", ["--data", "{root}/latin1.jsonl"], "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9"),
    ("evaluate", ["--data", "{root}/truncated.parquet"], "truncated.parquet: not a readable Parquet file"),
    ("evaluate", ["--data", "{root}/broken.json", "--out", "{root}/no/such/dir/x.json"], "--out: the directory of"),
]


def assert_one_line_error(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and message in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr


assert len(TRAIN_CASES) + len(SCRIPT_CASES) >= 30  # the reliability issue's minimum


@pytest.mark.parametrize("arguments, message", TRAIN_CASES, ids=[case[1][:40] for case in TRAIN_CASES])
def test_bad_training_inputs(files, cache_dir, tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    fill = {"root": files["root"], "checkpoint": files["checkpoint"]}
    output = tmp_path / "out"
    recipe, *overrides = [a.format(**fill) for a in arguments]
    # The case's own overrides come last, so they win over the defaults (train.output_dir included).
    argv = [recipe, *QUIET, f"train.output_dir={output}", *overrides]
    before = sorted(str(p) for p in files["root"].rglob("*"))
    code = entry_point("train")(argv)
    assert_one_line_error(code, capsys.readouterr().err, message.format(**fill))
    assert not output.exists(), "a refused run wrote its output directory"
    assert sorted(str(p) for p in files["root"].rglob("*")) == before, "a refused run wrote a file"


def test_an_unknown_basis_backend_is_refused_before_anything_loads(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("NOLA_BASIS_BACKEND", "cuda")
    output = tmp_path / "out"
    code = entry_point("train")([TINY, *QUIET, f"train.output_dir={output}"])
    assert_one_line_error(code, capsys.readouterr().err,
                          "NOLA_BASIS_BACKEND='cuda': expected one of auto, compiled, eager")
    assert not output.exists()


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))

    def load_model(*arguments, **keywords):
        raise AssertionError("the base model was loaded for a run that cannot write its output_dir")

    monkeypatch.setattr("nola.training.recipe.load_model", load_model)
    output = tmp_path / "run"
    output.write_text("my notes\n")
    code = entry_point("train")([TINY, *QUIET, f"train.output_dir={output}"])
    assert_one_line_error(code, capsys.readouterr().err, f"train.output_dir: {output} is a file, not a directory")
    assert output.read_text() == "my notes\n" and list(tmp_path.iterdir()) == [output]


def without_file_locks(monkeypatch, directory, code: int) -> None:
    """Make `directory` behave as a filesystem without flock (some NFS, SMB and FUSE mounts); others still lock."""
    real_flock = fcntl.flock

    def flock(handle, operation):
        if handle.name.startswith(str(directory)):
            raise OSError(code, os.strerror(code))
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK], ids=errno.errorcode.get)
def test_a_filesystem_without_file_locks_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code):
    without_file_locks(monkeypatch, tmp_path, code)
    existing = tmp_path / "existing"
    existing.mkdir()
    for output in (tmp_path / "new" / "run", existing):
        with pytest.raises(NolaError) as error:
            acquire_run_lock(output)
        assert str(error.value).startswith(f"train.output_dir: the filesystem of {output} does not support file locks")
        assert "choose an output_dir on a local filesystem" in str(error.value)
    assert list(tmp_path.iterdir()) == [existing] and not any(existing.iterdir())


def test_a_filesystem_without_file_locks_stops_training_with_one_line(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    without_file_locks(monkeypatch, tmp_path, errno.ENOSYS)
    output = tmp_path / "out"
    code = entry_point("train")([TINY, *QUIET, f"train.output_dir={output}"])
    assert_one_line_error(code, capsys.readouterr().err, f"the filesystem of {output} does not support file locks")
    assert not output.exists()


@pytest.mark.parametrize("place", ["before the recipe", "before the overrides", "between them", "after them"])
def test_dry_run_may_stand_anywhere_among_the_overrides(tmp_path, capsys, place):
    """7b.yaml ships its config_json, so its dry run needs no checkpoint, hub or cache. An output_dir that is a file
    does not matter: a dry run writes nothing."""
    overrides = ["train.micro_batch_size=3", "data.source_max_len=100", f"train.output_dir={tmp_path / 'a_file'}"]
    (tmp_path / "a_file").write_text("")
    recipe = str(REPO_ROOT / "recipes" / "7b.yaml")
    argv = {"before the recipe": ["--dry-run", recipe, *overrides],
            "before the overrides": [recipe, "--dry-run", *overrides],
            "between them": [recipe, overrides[0], "--dry-run", *overrides[1:]],
            "after them": [recipe, *overrides, "--dry-run"]}[place]
    assert entry_point("train")(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["micro_batch_size"] == 3 and report["sequence_length"] == 100 + 512
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]


@pytest.mark.parametrize("script, arguments, message", SCRIPT_CASES, ids=[case[2][:40] for case in SCRIPT_CASES])
def test_bad_script_inputs(files, cache_dir, tmp_path, monkeypatch, capsys, script, arguments, message):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    fill = {"root": files["root"], "adapter": files["adapter"]}
    given = [a.format(**fill) for a in arguments]
    defaults = {"--base": "embedded:tiny-llama", "--adapter": str(files["adapter"])}
    if script == "merge_and_export":
        defaults["--out"] = str(tmp_path / "out")
    for flag, value in defaults.items():
        if flag not in given:
            given += [flag, value]
    before = sorted(str(p) for p in files["root"].rglob("*"))
    code = entry_point(script)(given)
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()
    assert sorted(str(p) for p in files["root"].rglob("*")) == before, "a refused command wrote a file"

