"""What nola reads and writes is safe to hand around: no pickles loaded, no remote code run unless asked, and no
credential from the environment ends up in a file or a log."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT, run_train

SOURCES = [*sorted((REPO_ROOT / "nola").glob("*.py")), *sorted((REPO_ROOT / "scripts").glob("*.py")),
           REPO_ROOT / "train_llama.py"]


def calls_and_keywords(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            yield name, {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}


def test_no_code_path_unpickles_or_runs_remote_code_by_itself():
    for path in SOURCES:
        for name, keywords in calls_and_keywords(path):
            assert name not in ("torch.load", "pickle.load", "pickle.loads", "load"), f"{path.name}: {name}"
            assert keywords.get("trust_remote_code") not in ("True",), f"{path.name}: trust_remote_code=True"
            assert keywords.get("weights_only") != "False", f"{path.name}: weights_only=False"
        assert "import pickle" not in path.read_text(), path.name


@pytest.mark.slow
def test_credentials_in_the_environment_are_never_written_or_printed(cache_dir, tmp_path):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
               "HF_TOKEN": "hf_secretTOKENvalue0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_otherSECRET987654321"}
    output = tmp_path / "run"
    completed = run_train(cache_dir, "recipes/tiny.yaml", "train.max_steps=2", "train.save_steps=2",
                          "train.eval_steps=2", "train.sample_generations=1", "log.wandb_mode=offline",
                          f"train.output_dir={output}", **secrets)
    written = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in written) and any("wandb" in p.parts for p in written)
    for secret in secrets.values():
        assert secret not in completed.stdout and secret not in completed.stderr
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret[:6]}... written to {path}"
