"""FSDP2 with the lean, layer-by-layer load of the 4-bit base (recipes/accelerate/fsdp.yaml, nola.streamed_load,
nola.training.fsdp), on CPU processes over gloo.

In-process: the chunked quantisation is bitwise bitsandbytes' own `quantize_4bit` (nf4/fp4, single/double quant,
uint8/bfloat16 storage, blocks straddling rows, many chunks); the streamed load is bitwise `load_model`
(from_pretrained) for the real tiny LLaMA (tied head, one safetensors file) and a random one with its own head saved
as an index-sharded checkpoint; and what FSDP2 cannot serve (uint8 storage, an SVD start, the launch settings this
loader does not support) is refused in one line, exit code 2, nothing written.

End to end (two processes): the shipped recipes/70b.yaml on the real tiny LLaMA trains under FSDP2 as it does under
DDP with the same split (same losses, adapter, adapter description and evaluations), with the adapter float32
inside the forward under bf16 autocast on both ranks; in float32 without autocast, FSDP2 over 2 ranks trains like
one process. Checkpoints move between FSDP2, one process, DDP and ZeRO-3 (they store tensors by parameter name).

Every run trains 4 steps of 8 sequences: one process x 4 x 2 accumulated, or two processes x 2 x 2. bf16 runs on
different splits are not compared by their adapters: Adam's normalised first updates amplify bf16 rounding of a
different summation order to ~lr (see ../shared/notes/environment-facts.md); those comparisons run in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nola.errors import NolaError
from tests.conftest import REPO_ROOT, metrics, run_script, run_train, shared_data, tiny_llama
from tests.test_bad_inputs import assert_one_line_error
from tests.test_distributed import TWO_PROCESSES, accelerate

TOLERANCE = 5e-5  # on coefficients of magnitude ~3e-3 after 4 steps; measured: 0.0 (same split), 1.3e-6 (fp32, 1 vs 2)
FSDP = ("--config_file", "recipes/accelerate/fsdp.yaml", "--num_processes", "2")
DDP = TWO_PROCESSES["ddp-config"]
ZERO3 = TWO_PROCESSES["zero3"]


# --- the chunked quantisation is bitsandbytes' own ------------------------------------------------------------------

def quant_state_tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor a QuantState holds (nested state included), by name."""
    tensors = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        tensors.update(offset=state.offset.reshape(1), state2_absmax=state.state2.absmax, state2_code=state.state2.code)
    return tensors


def bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bytes, not merely equal values (NaN == NaN, -0.0 != 0.0)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(bytes_of(actual), bytes_of(expected)), what


STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16}
SHAPES = [(10, 96), (7, 160), (33, 64), (65, 33), (48, 32)]  # blocks of 64 straddle rows in all but [33, 64]


# An odd number of packed bytes has no bfloat16 view (bitsandbytes refuses it too): [65, 33] is uint8 only.
QUANTISATION_CASES = [(quant_type, double_quant, storage, shape) for quant_type in ("nf4", "fp4")
                      for double_quant in (False, True) for storage in STORAGE for shape in SHAPES
                      if storage == "uint8" or shape[0] * shape[1] % 4 == 0]


@pytest.mark.parametrize("quant_type, double_quant, storage, shape", QUANTISATION_CASES,
                         ids=[f"{q}-{'double' if d else 'single'}-{st}-{sh[0]}x{sh[1]}"
                              for q, d, st, sh in QUANTISATION_CASES])
def test_chunked_quantisation_is_bitsandbytes_quantize_4bit(quant_type, double_quant, storage, shape):
    import bitsandbytes.functional as bnb_functional

    from nola.streamed_load import quantize_4bit_in_chunks

    rows, columns = shape
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float32)
    weight[rows // 2] *= 40  # one row of outliers: blocks with very different absmax, far from the mean
    calls = []

    def weight_rows(start, stop):
        calls.append((start, stop))
        return weight[start:stop]

    packed, state = quantize_4bit_in_chunks(weight_rows, shape, torch.bfloat16, torch.device("cpu"), quant_type,
                                            double_quant, STORAGE[storage], blocksize=64, chunk_elements=128)
    expected, expected_state = bnb_functional.quantize_4bit(weight.to(torch.bfloat16), blocksize=64,
                                                            compress_statistics=double_quant, quant_type=quant_type,
                                                            quant_storage=STORAGE[storage])
    # The rows were read in order, each once, in more than one chunk (or the test would not test the chunking).
    assert [row for start, stop in calls for row in range(start, stop)] == list(range(rows))
    assert len(calls) > 1, calls
    assert_same_bytes(packed, expected, "packed codes")
    assert state.nested == expected_state.nested == double_quant
    assert state.shape == expected_state.shape == torch.Size(shape)
    assert state.dtype == expected_state.dtype == torch.bfloat16
    assert (state.blocksize, state.quant_type) == (expected_state.blocksize, expected_state.quant_type)
    ours, theirs = quant_state_tensors(state), quant_state_tensors(expected_state)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert_same_bytes(ours[name], theirs[name], name)
    if double_quant:
        assert state.state2.blocksize == expected_state.state2.blocksize
    # And it dequantises to the same weight (the state is usable, not merely equal field by field).
    assert_same_bytes(bnb_functional.dequantize_4bit(packed, state), bnb_functional.dequantize_4bit(expected,
                                                                                                    expected_state),
                      "dequantised weight")


def test_chunked_quantisation_reads_from_any_source_dtype():
    """`weight_rows` may return float32 or bfloat16 rows: each chunk is cast elementwise to the compute dtype."""
    import bitsandbytes.functional as bnb_functional

    from nola.streamed_load import quantize_4bit_in_chunks

    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    packed, state = quantize_4bit_in_chunks(lambda start, stop: weight[start:stop], (24, 96), torch.float32,
                                            torch.device("cpu"), "nf4", True, torch.uint8, chunk_elements=192)
    expected, expected_state = bnb_functional.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True,
                                                            quant_type="nf4", quant_storage=torch.uint8)
    assert_same_bytes(packed, expected, "packed codes")
    assert state.dtype == torch.float32
    for name, tensor in quant_state_tensors(expected_state).items():
        assert_same_bytes(quant_state_tensors(state)[name], tensor, name)


# --- the streamed load is from_pretrained's ------------------------------------------------------------------------

def reference_and_streamed(directory: Path, compute_dtype: str = "bfloat16", mixed_precision: str = "bf16",
                           load_in_4bit: bool = True):
    """`load_model` (from_pretrained) and the streamed load of the same checkpoint, the latter prepared block by
    block as nola.training.fsdp prepares it (without sharding: `on_block` only records the blocks)."""
    from nola.modeling import (ModelSection, _DTYPES, finish_loaded_model, load_model, load_model_config,
                               prepare_kbit_block, quantization_config)
    from nola.streamed_load import load_streamed

    section = ModelSection(name_or_path=str(directory), load_in_4bit=load_in_4bit, compute_dtype=compute_dtype,
                           quant_storage="bfloat16", torch_dtype=compute_dtype)
    reference = load_model(section, torch.device("cpu"), mixed_precision)
    autocast = mixed_precision != "no"

    def prepare_block(block):
        prepare_kbit_block(block, autocast) if load_in_4bit else block.requires_grad_(False)

    blocks = []
    streamed = load_streamed(load_model_config(section), directory, quantization_config(section),
                             _DTYPES[compute_dtype], torch.device("cpu"), prepare_block, blocks.append)
    return reference, finish_loaded_model(streamed, section, quantized=load_in_4bit), blocks


def assert_same_model(streamed, reference) -> None:
    import bitsandbytes as bnb

    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert_same_bytes(ours[name], theirs[name], name)
    buffers = dict(reference.named_buffers())  # the non-persistent ones too (rotary inverse frequencies)
    assert sorted(name for name, _ in streamed.named_buffers()) == sorted(buffers)
    for name, buffer in streamed.named_buffers():
        assert_same_bytes(buffer, buffers[name], name)
    # The parts the state dict does not show: which linears are 4-bit, dtypes of the parameters (norms float32
    # after k-bit preparation), frozen, and the quantisation state the forward reads.
    modules = dict(reference.named_modules())
    for name, module in streamed.named_modules():
        assert type(module) is type(modules[name]), name
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.quant_state is module.quant_state, name
            expected = quant_state_tensors(modules[name].weight.quant_state)
            for key, tensor in quant_state_tensors(module.weight.quant_state).items():
                assert_same_bytes(tensor, expected[key], f"{name}.{key}")
    parameters = dict(reference.named_parameters())
    for name, parameter in streamed.named_parameters():
        assert (parameter.dtype, parameter.requires_grad) == (parameters[name].dtype, False), name
        assert parameter.device.type == "cpu", name
    assert streamed.config.tie_word_embeddings == reference.config.tie_word_embeddings
    if reference.config.tie_word_embeddings:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def assert_same_logits(streamed, reference, mixed_precision: str = "bf16", quantized: bool = True) -> None:
    """The same logits, bit for bit, in training mode (with a backward through a 4-bit base: its inputs require
    grad, as gradient checkpointing needs) and in eval mode."""
    from nola.modeling import autocast

    tokens = torch.arange(12).reshape(2, 6) % streamed.config.vocab_size
    for training in (True, False):
        logits = []
        for model in (streamed, reference):
            model.train(training)
            with torch.set_grad_enabled(training), autocast(mixed_precision, "cpu"):
                output = model(input_ids=tokens).logits
            assert output.requires_grad == (training and quantized)
            if output.requires_grad:
                output.float().square().mean().backward()  # inputs require grad: a graph to go back through
            logits.append(output.detach())
        assert_same_bytes(*logits, f"logits ({'train' if training else 'eval'} mode)")


@pytest.mark.parametrize("compute_dtype, mixed_precision", [("bfloat16", "bf16"), ("float32", "no")],
                         ids=["bf16-autocast", "float32"])
def test_the_streamed_load_is_from_pretrained_for_the_real_tiny_llama(compute_dtype, mixed_precision):
    """nf4 + double quant stored as bfloat16 (recipes/70b.yaml), computing in bf16 under autocast or in float32
    without (then the embeddings and head are float32 too)."""
    reference, streamed, blocks = reference_and_streamed(shared_data("stories260K-hf"), compute_dtype,
                                                         mixed_precision)
    assert reference.config.tie_word_embeddings  # the case of a head the checkpoint does not hold
    assert_same_model(streamed, reference)
    # Each decoder layer was handed over on its own, in order, then the whole model.
    assert blocks == [*streamed.model.layers, streamed]
    assert_same_logits(streamed, reference, mixed_precision)


def test_the_streamed_load_is_from_pretrained_for_an_index_sharded_checkpoint(tmp_path):
    from nola.streamed_load import INDEX_FILE, CheckpointReader

    model = tiny_llama(tie_word_embeddings=False, init_seed=7)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) > 2 and "lm_head.weight" in index  # sharded, with a head of its own
    assert not (tmp_path / "model.safetensors").exists()
    reader = CheckpointReader(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(reader.rows(name, 3, 9), model.state_dict()[name][3:9])
    reader.close()
    reference, streamed, blocks = reference_and_streamed(tmp_path)
    assert not reference.config.tie_word_embeddings
    assert_same_model(streamed, reference)
    assert streamed.lm_head.weight.data_ptr() != streamed.model.embed_tokens.weight.data_ptr()
    assert len(blocks) == 3
    assert_same_logits(streamed, reference)


def test_the_streamed_load_of_a_float_base_is_from_pretrained():
    reference, streamed, blocks = reference_and_streamed(shared_data("stories260K-hf"), "float32", "no",
                                                         load_in_4bit=False)
    assert_same_model(streamed, reference)
    assert all(p.dtype == torch.float32 for p in streamed.parameters())
    assert len(blocks) == streamed.config.num_hidden_layers + 1
    assert_same_logits(streamed, reference, "no", quantized=False)


def test_a_checkpoint_without_safetensors_is_one_line(tmp_path):
    from nola.streamed_load import CheckpointReader

    with pytest.raises(NolaError, match=r"model\.name_or_path: .* has no model\.safetensors or model\.safetensors"
                                        r"\.index\.json \(sharded loading reads safetensors checkpoints only\)"):
        CheckpointReader(tmp_path)


# --- the launch settings: what this loader cannot serve is one line naming the key ---------------------------------

FSDP_ENVIRONMENT = {"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_OFFLOAD_PARAMS": "false",
                    "FSDP_RESHARD_AFTER_FORWARD": "true"}


@pytest.fixture
def fsdp_environment(monkeypatch):
    for name, value in FSDP_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("reshard, expected", [("true", True), ("false", False), ("True", True), ("2", 2), ("1", 1)])
def test_shard_options_follow_the_launch(fsdp_environment, reshard, expected):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from nola.training.fsdp import shard_options

    fsdp_environment.setenv("FSDP_RESHARD_AFTER_FORWARD", reshard)
    options = shard_options(2, "cpu")
    assert options["reshard_after_forward"] == expected and type(options["reshard_after_forward"]) is type(expected)
    assert type(options["offload_policy"]) is OffloadPolicy
    fsdp_environment.setenv("FSDP_OFFLOAD_PARAMS", "true")  # on a GPU, offloading the shards to host RAM is served
    assert type(shard_options(2, "cuda")["offload_policy"]) is CPUOffloadPolicy


BAD_SHARD_SETTINGS = [
    ({"FSDP_VERSION": "1"}, 2, "cpu", "fsdp_version must be 2"),
    ({"FSDP_VERSION": None}, 2, "cpu", "fsdp_version must be 2"),  # accelerate's default is FSDP1
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, 2, "cpu", "fsdp_activation_checkpointing"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, 2, "cpu", "fsdp_offload_params"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "3"}, 2, "cpu", "fsdp_reshard_after_forward=3"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "0"}, 2, "cpu", "fsdp_reshard_after_forward=0"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "sometimes"}, 4, "cuda", "fsdp_reshard_after_forward=sometimes"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "-2"}, 4, "cuda", "fsdp_reshard_after_forward=-2"),
]


@pytest.mark.parametrize("settings, world_size, device_type, message", BAD_SHARD_SETTINGS,
                         ids=[f"{next(iter(case[0]))}={next(iter(case[0].values()))}" for case in BAD_SHARD_SETTINGS])
def test_shard_options_refuse_what_the_loader_cannot_serve(fsdp_environment, settings, world_size, device_type,
                                                           message):
    from nola.training.fsdp import shard_options

    for name, value in settings.items():
        if value is None:
            fsdp_environment.delenv(name)
        else:
            fsdp_environment.setenv(name, value)
    with pytest.raises(NolaError) as error:
        shard_options(world_size, device_type)
    text = str(error.value)
    assert text.startswith("the accelerate config: ") and message in text, text
    assert "\n" not in text


def test_uint8_storage_of_a_4bit_base_is_refused_for_sharding():
    from nola.modeling import ModelSection
    from nola.training.fsdp import check_sharded_model

    with pytest.raises(NolaError, match=r"^model\.quant_storage: uint8 packed 4-bit weights cannot be flattened"):
        check_sharded_model(ModelSection(load_in_4bit=True, quant_storage="uint8"))
    check_sharded_model(ModelSection(load_in_4bit=True, quant_storage="bfloat16"))
    check_sharded_model(ModelSection(load_in_4bit=False, quant_storage="uint8"))  # a float base has no packed codes


# --- two processes, end to end -------------------------------------------------------------------------------------

LAUNCHERS = {"one": None, "fsdp": FSDP, "ddp": DDP, "zero3": ZERO3}
FLOAT32 = ["model.compute_dtype=float32", "train.mixed_precision='no'"]  # quoted: a bare no is YAML's false


def recipe_arguments(output_dir: Path, engine: str) -> list[str]:
    """recipes/70b.yaml as shipped (nf4, double quant, bf16 compute and storage, bf16 autocast, checkpointing) on the
    real tiny LLaMA: 4 steps of 8 sequences, a checkpoint and an eval every 2."""
    return ["recipes/70b.yaml", f"model.name_or_path={shared_data('stories260K-hf')}",
            f"data.path={shared_data('alpaca/alpaca_subset.json')}", "mmlu.path=null", "train.max_steps=4",
            "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1", "train.eval_max_batches=2",
            "data.validation_size=16", "data.source_max_len=96", "data.target_max_len=64", "log.wandb_mode=disabled",
            f"train.micro_batch_size={4 if engine == 'one' else 2}", "train.grad_accum_steps=2",
            f"train.output_dir={output_dir}"]


def train(cache_dir, output_dir: Path, engine: str, *extra: str, check: bool = True, **environment: str):
    """train_llama.py (through the forward-dtype recorder) on `engine`: one process, or two under its config."""
    launcher = accelerate(*LAUNCHERS[engine]) if LAUNCHERS[engine] else None
    completed = run_script(cache_dir, "tests/record_forward_dtypes.py", *recipe_arguments(output_dir, engine), *extra,
                           launcher=launcher, check=check, environment={
                               "NOLA_DTYPE_RECORD": str(output_dir.parent / f"{output_dir.name}-dtypes"),
                               **environment})
    if check:
        kinds = {"one": {"DistributedType.NO"}, "fsdp": {"FSDP2"}, "zero3": {"DistributedType.DEEPSPEED"},
                 "ddp": {"DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU"}}[engine]
        facts = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith('{"parameters"')]
        assert len(facts) == 1, completed.stdout[-3000:]  # rank 0 alone reports
        assert facts[0]["distributed_type"] in kinds, facts
        assert facts[0]["processes"] == (1 if engine == "one" else 2), facts
    return completed


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(actual, expected, tolerance: float = TOLERANCE) -> None:
    assert actual.keys() == expected.keys()
    worst = max((actual[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst <= tolerance, worst
    assert max(t.abs().max().item() for t in expected.values()) > 20 * TOLERANCE  # not trivially small


def assert_identical_adapter(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(bytes_of(actual[k]), bytes_of(expected[k]))]
    assert not different, different[:5]
    assert max(t.abs().max().item() for t in expected.values()) > 20 * TOLERANCE


def losses(output_dir: Path, since: int = 0) -> dict[tuple[int, str], float]:
    return {(row["step"], key): row[key] for row in metrics(output_dir) for key in ("loss", "eval_loss")
            if key in row and row["step"] > since}


def assert_same_losses(actual: Path, expected: Path, since: int = 0, rel: float = 0.0) -> None:
    ours, theirs = losses(actual, since), losses(expected, since)
    assert sorted(ours) == sorted(theirs) and len(ours) >= 3, (sorted(ours), sorted(theirs))
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=rel, abs=0), key


# The bf16 runs also evaluate everything a run can evaluate, on every rank (under FSDP each forward is a collective,
# so the ranks must run equally many): the whole held-out set of 17 (ranks score 9 and 8), MMLU on 7 questions (4 and
# 3), greedy answers and a sample generation. The split of the data depends on validation_size: a run resuming from
# theirs must share it.
SPLIT = ["data.validation_size=17", "train.eval_max_batches=null"]
EVALUATIONS = [*SPLIT, "mmlu.max_examples=7", "mmlu.max_length=256", "train.sample_generations=1",
               "train.max_new_tokens=4", "train.answer_accuracy=3"]

RUNS = {  # name: (engine, extra overrides)
    "fsdp-bf16": ("fsdp", EVALUATIONS),
    "ddp-bf16": ("ddp", EVALUATIONS),
    "fsdp-fp32": ("fsdp", FLOAT32),
    "one-fp32": ("one", FLOAT32),
}


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """The uninterrupted reference runs, each trained once per module, when a test first asks for it."""
    done: dict[str, tuple[Path, object]] = {}

    def run(name: str) -> Path:
        if name not in done:
            engine, extra = RUNS[name]
            output_dir = tmp_path_factory.mktemp("runs") / name
            if extra is EVALUATIONS:
                extra = [f"mmlu.path={shared_data('mmlu/zero_shot_mmlu_val.json')}", *extra]
            done[name] = output_dir, train(cache_dir, output_dir, engine, *extra)
        return done[name][0]

    run.stdout = lambda name: done[name][1].stdout
    return run


def forward_dtypes(output_dir: Path, rank: int) -> list[dict]:
    return json.loads((output_dir.parent / f"{output_dir.name}-dtypes.{rank}.json").read_text())


@pytest.mark.slow
def test_fsdp_trains_the_70b_recipe_like_ddp_with_the_same_split(runs):
    """Same split (2 ranks x 2 micro-batches of 2), same bf16 autocast: the base sharded by FSDP2 or replicated by
    DDP computes the same forward, and the adapter's gradients are averaged the same way, so the runs agree."""
    fsdp, ddp = runs("fsdp-bf16"), runs("ddp-bf16")
    facts = json.loads(next(line for line in runs.stdout("fsdp-bf16").splitlines() if '"FSDP2"' in line))
    assert facts["deferred_projection"] is True and facts["mixed_precision"] == "bf16"
    assert facts["validation_examples"] == 17
    assert_same_losses(fsdp, ddp, rel=1e-6)
    assert_same_adapter(adapter(fsdp), adapter(ddp))
    assert (fsdp / "checkpoints" / "step-2").is_dir() and (fsdp / "checkpoints" / "step-4").is_dir()
    # The adapter describes its base as DDP's does (embedding sample, which linears are 4-bit, nf4 settings,
    # autocast; and, the tensors being the same, the same weights hash): merge and export treat both alike.
    assert (json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
            == json.loads((ddp / "adapter" / "adapter_config.json").read_text()))
    # The evaluations after training, run on both ranks, score the same (the base and adapter are the same).
    ours, theirs = (json.loads((run / "run.json").read_text()) for run in (fsdp, ddp))
    assert ours["steps"] == 4 and ours["mmlu_examples"] == 7 and ours["answer_examples"] == 3
    for key in ("final_eval_loss", "mmlu_accuracy", "mmlu_micro_accuracy", "answer_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    samples = [stdout[stdout.index("--- generations after training"):] for stdout in
               map(runs.stdout, ("fsdp-bf16", "ddp-bf16")) if "--- generations after training" in stdout]
    assert len(samples) == 2 and samples[0] == samples[1], samples
    assert runs.stdout("fsdp-bf16").count("--- generations after training") == 1  # rank 0 alone prints


@pytest.mark.slow
def test_under_fsdp_the_adapter_computes_in_float32_under_bf16_autocast_on_every_rank(runs):
    fsdp = runs("fsdp-bf16")
    for rank in (0, 1):
        seen = forward_dtypes(fsdp, rank)
        assert seen, f"rank {rank}: no adapted forward was recorded"
        assert {(s["parameter"], s["a"], s["b"]) for s in seen} == {("torch.float32",) * 3}, seen
        assert any(s["autocast"] for s in seen), f"rank {rank}: the training forward did not run under autocast"


@pytest.mark.slow
def test_fsdp_in_float32_trains_like_one_process(runs):
    """Without autocast, float32 compute: two FSDP2 ranks and one process differ by float reassociation alone."""
    fsdp, one = runs("fsdp-fp32"), runs("one-fp32")
    for rank in (0, 1):
        assert not any(s["autocast"] for s in forward_dtypes(fsdp, rank))
    assert_same_losses(fsdp, one, rel=1e-5)
    assert_same_adapter(adapter(fsdp), adapter(one))


def resume_from(source: Path, step: int, destination: Path) -> Path:
    """A copy of the source run's checkpoint at `step` (outside any run's checkpoints/)."""
    checkpoint = destination / f"from-{source.name}-step-{step}"
    shutil.copytree(source / "checkpoints" / f"step-{step}", checkpoint)
    return checkpoint


@pytest.mark.slow
def test_a_fsdp_checkpoint_resumes_on_ddp_exactly(cache_dir, runs, tmp_path):
    """Same split and precision (bf16), another engine: the resumed run ends bit for bit where FSDP2's own did."""
    fsdp = runs("fsdp-bf16")
    output = tmp_path / "ddp-resumed"
    completed = train(cache_dir, output, "ddp", *SPLIT, f"train.resume_from={resume_from(fsdp, 2, tmp_path)}")
    assert "from-fsdp-bf16-step-2" in completed.stdout
    assert_same_losses(output, fsdp, since=2)
    assert_identical_adapter(adapter(output), adapter(fsdp))


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_on_one_process_and_on_zero3(cache_dir, runs, tmp_path):
    """Float32: two FSDP2 ranks SIGKILLed in step 3 (after the step-2 checkpoint); the run resumes in place on one
    plain process (train.resume_from=auto), and its step-2 checkpoint on two ZeRO-3 processes. Both end where the
    uninterrupted runs do."""
    killed = tmp_path / "killed"
    completed = train(cache_dir, killed, "fsdp", *FLOAT32, check=False, NOLA_FAILPOINT="micro-batch@3")
    assert completed.returncode != 0 and not (killed / "adapter").exists(), completed.stderr[-3000:]
    assert sorted(path.name for path in (killed / "checkpoints").iterdir()) == ["step-2"]
    checkpoint = resume_from(killed, 2, tmp_path)

    resumed = train(cache_dir, killed, "one", *FLOAT32, "train.resume_from=auto")
    assert "checkpoints/step-2" in resumed.stdout
    assert [row["step"] for row in metrics(killed) if "loss" in row] == [1, 2, 3, 4]
    assert_same_losses(killed, runs("one-fp32"), rel=1e-5)
    assert_same_adapter(adapter(killed), adapter(runs("one-fp32")))

    zero3 = tmp_path / "zero3-resumed"
    train(cache_dir, zero3, "zero3", *FLOAT32, f"train.resume_from={checkpoint}")
    assert_same_losses(zero3, runs("fsdp-fp32"), since=2, rel=1e-5)
    assert_same_adapter(adapter(zero3), adapter(runs("fsdp-fp32")))


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_fsdp(cache_dir, runs, tmp_path):
    one = runs("one-fp32")
    output = tmp_path / "fsdp-resumed"
    train(cache_dir, output, "fsdp", *FLOAT32, f"train.resume_from={resume_from(one, 2, tmp_path)}")
    assert_same_losses(output, one, since=2, rel=1e-5)
    assert_same_adapter(adapter(output), adapter(one))


# --- what FSDP2 cannot train is refused in one line, before anything loads or is written -------------------------

def recipe_paths(recipe: str, output_dir: Path) -> list[str]:
    return [str(REPO_ROOT / "recipes" / recipe), f"model.name_or_path={shared_data('stories260K-hf')}",
            f"data.path={shared_data('alpaca/alpaca_subset.json')}", "mmlu.path=null", "log.wandb_mode=disabled",
            "train.max_steps=2", f"train.output_dir={output_dir}"]


BAD_FSDP_RUNS = [  # (recipe, overrides, FSDP_* settings, message)
    ("7b.yaml", [], {}, "model.quant_storage: uint8 packed 4-bit weights cannot be flattened by FSDP"),
    ("70b.yaml", ["adapter.method=lora", "adapter.init=svd"], {}, "adapter.init: svd is not supported under FSDP"),
    ("70b.yaml", [], {"FSDP_VERSION": "1"}, "the accelerate config: fsdp_version must be 2"),
    ("70b.yaml", [], {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "the accelerate config: fsdp_activation_checkpointing"),
    ("70b.yaml", [], {"FSDP_OFFLOAD_PARAMS": "true"}, "the accelerate config: fsdp_offload_params"),
    ("70b.yaml", [], {"FSDP_RESHARD_AFTER_FORWARD": "3"}, "the accelerate config: fsdp_reshard_after_forward=3"),
]


@pytest.mark.parametrize("recipe, overrides, settings, message", BAD_FSDP_RUNS,
                         ids=[case[3].split(": ")[-1][:40] for case in BAD_FSDP_RUNS])
def test_a_run_fsdp_cannot_serve_is_one_line(fsdp_environment, fresh_accelerate_state, cache_dir, tmp_path, capsys,
                                             recipe, overrides, settings, message):
    """train_llama.py's main() in this process, in the environment accelerate gives a rank of an FSDP launch."""
    from tests.conftest import entry_point

    fsdp_environment.setenv("NOLA_CACHE_DIR", str(cache_dir))
    fsdp_environment.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp_environment.setenv("NOLA_ENGINE", "")  # fsdp_launch() marks the process; monkeypatch undoes it
    for name, value in settings.items():
        fsdp_environment.setenv(name, value)
    output = tmp_path / "out"
    code = entry_point("train")([*recipe_paths(recipe, output), *overrides])
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert not output.exists(), "a refused run wrote its output directory"


def accelerate_config(tmp_path: Path, **changes) -> Path:
    """recipes/accelerate/fsdp.yaml with some fsdp_config keys changed."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    config["fsdp_config"].update(changes)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD_LAUNCHES = [  # (recipe, changes to fsdp.yaml's fsdp_config, message)
    ("7b.yaml", {}, "error: model.quant_storage: uint8 packed 4-bit weights cannot be flattened by FSDP"),
    ("70b.yaml", {"fsdp_reshard_after_forward": 3},
     "error: the accelerate config: fsdp_reshard_after_forward=3 must be true, false or a number of ranks that "
     "divides the world size 2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, changes, message", BAD_LAUNCHES, ids=["uint8-storage", "reshard-after-forward-3"])
def test_a_launch_fsdp_cannot_serve_stops_every_rank_with_one_line(cache_dir, tmp_path, recipe, changes, message):
    """Through `accelerate launch` with two processes: each rank says it in one line and exits 2 (the launcher then
    exits 1 with torchrun's own report, which is not nola's to shape), before anything is written."""
    launcher = accelerate("--config_file", str(accelerate_config(tmp_path, **changes)), "--num_processes", "2")
    output = tmp_path / "out"
    completed = run_train(cache_dir, *recipe_paths(recipe, output), launcher=launcher, check=False)
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and all(message in line for line in errors), completed.stderr[-3000:]
    assert "exitcode  : 2" in completed.stderr, completed.stderr[-3000:]  # the rank's own exit code
    # No traceback from a rank (the launcher's own, from accelerate and torchrun, names none of our files).
    assert f'{REPO_ROOT / "nola"}/' not in completed.stderr, completed.stderr[-3000:]
    assert f'{REPO_ROOT / "train_llama.py"}", line' not in completed.stderr, completed.stderr[-3000:]
    assert "NolaError" not in completed.stderr
    assert not output.exists(), "a refused run wrote its output directory"
