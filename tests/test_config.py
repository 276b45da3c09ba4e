"""Recipe loading: every shipped recipe parses, overrides are typed, mistakes are one line naming the key."""

from __future__ import annotations

import pytest

from nola.training.config import load_recipe
from nola.errors import NolaError
from tests.conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_and_documents_every_key(recipe):
    config = load_recipe(recipe)
    assert config.train.max_steps >= 1
    lines = recipe.read_text().splitlines()
    settings = [line for line in lines if line.startswith("  ") and ":" in line]
    undocumented = [line for line in settings if "#" not in line]
    assert not undocumented, f"keys without a comment in {recipe.name}: {undocumented}"


def test_paper_recipes_use_the_paper_setup():
    for size, num_basis, micro, accum in (("7b", 128, 16, 16), ("13b", 256, 8, 32), ("70b", 512, 2, 128)):
        config = load_recipe(REPO_ROOT / "recipes" / f"{size}.yaml")
        assert (config.adapter.method, config.adapter.rank, config.adapter.alpha) == ("nola", 16, 4.0)
        assert config.adapter.num_basis == num_basis and config.adapter.target_modules == "all-linear"
        assert config.model.load_in_4bit and config.model.quant_type == "nf4" and config.model.double_quant
        assert config.model.compute_dtype == "bfloat16" and config.model.gradient_checkpointing
        assert (config.train.lr, config.train.lr_scheduler, config.train.warmup_ratio) == (1e-3, "constant", 0.03)
        assert config.train.max_grad_norm == 0.9 and config.train.max_steps == 200
        assert config.train.micro_batch_size * config.train.grad_accum_steps == 256 == micro * accum
        assert (config.data.source_max_len, config.data.target_max_len) == (384, 512)
        lora = load_recipe(REPO_ROOT / "recipes" / f"{size}_lora.yaml")
        assert (lora.adapter.method, lora.adapter.rank, lora.adapter.alpha) == ("lora", 1, 16.0)
        assert lora.train.lr == (2e-4 if size == "7b" else 1e-4)


def test_overrides_are_typed():
    config = load_recipe(
        REPO_ROOT / "recipes" / "tiny.yaml",
        ["train.max_steps=20", "train.lr=2e-4", "adapter.num_basis=64", "adapter.target_modules=[q_proj, v_proj]",
         "model.load_in_4bit=true", "train.resume_from=null", "log.wandb_mode=disabled"],
    )
    assert config.train.max_steps == 20 and config.train.lr == 2e-4 and config.adapter.num_basis == 64
    assert config.adapter.target_modules == ["q_proj", "v_proj"] and config.model.load_in_4bit is True
    assert config.train.resume_from is None and config.log.wandb_mode == "disabled"
    assert config.adapter_config().seed == config.train.seed


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "unknown key 'trian.lr' (did you mean 'train.lr'?)"),
        ("train.max_steps=1.5", "train.max_steps must be int, got 1.5"),
        ("train.lr=fast", "train.lr must be float, got 'fast'"),
        ("train.lr=0", "train.lr must be > 0"),
        ("adapter.rank=0", "adapter.rank: must be an integer >= 1"),
        ("adapter.num_basis=0", "adapter.num_basis: must be an integer >= 1"),
        ("adapter.method=dora", "adapter.method: 'dora' is not one of nola, lora, vera"),
        ("adapter.seed=4", "adapter.seed is derived, not set: use train.seed"),
        ("data.source_max_len=0", "data.source_max_len must be > 0"),
        ("model.quant_type=int8", "model.quant_type must be one of 'nf4', 'fp4'"),
        ("train.resume_from=/no/such/checkpoint", "train.resume_from: '/no/such/checkpoint' is not"),
        ("log.wandb_mode=cloud", "log.wandb_mode must be one of 'offline', 'online', 'disabled'"),
        ("max_steps", "expected dotted.key=value"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(override, message):
    with pytest.raises(NolaError) as error:
        load_recipe(REPO_ROOT / "recipes" / "tiny.yaml", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_recipe_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: 3\n   lr: [\n")
    with pytest.raises(NolaError, match=r"broken.yaml: line \d+ not valid YAML"):
        load_recipe(broken)
    flat = tmp_path / "flat.yaml"
    flat.write_text("max_steps: 3\n")
    with pytest.raises(NolaError, match="top-level key 'max_steps' must be a section"):
        load_recipe(flat)
    with pytest.raises(NolaError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
