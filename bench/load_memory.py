"""Load and step memory of a 4-bit base: one process against FSDP2 ranks (nola's lean load) and ZeRO-3 ranks,
measured as peak RSS on CPU.

    .venv/bin/python bench/load_memory.py      # ~400M-parameter random LLaMA: 1 process, FSDP2 and ZeRO-3 over 2 and 4
    .venv/bin/python bench/load_memory.py --layers 8 --engines fsdp,zero3 --processes 2,4 \
        --out bench/results/load_memory.json  # the committed artefact the README quotes

Why: transformers builds a quantised (bitsandbytes) model without deepspeed.zero.Init even under ZeRO-3
(modeling_utils: `needs_zero3_init = is_deepspeed_zero3_enabled() and not _is_quantized ...`), so every ZeRO-3 rank
quantises and holds the whole 4-bit model until `accelerator.prepare` partitions it. recipes/accelerate/fsdp.yaml
shards each layer as it is read (nola.training.fsdp). The question is whether each rank's load and step peaks are
the full 4-bit model or its 1/N share; `checks` in the JSON compares every FSDP2 run with the bound
(4-bit model)/N + one dense bf16 layer + the quantisation constants + 15%, with the one-process step peak, and with
the `--dry-run` figures for CPU kernels (`fsdp_cpu_kernels_*`).

How: a random LLaMA wide enough that its 4-bit weights stand out from the ~0.5 GB of imported libraries is saved
once (safetensors, `save_pretrained`) in a cache directory outside git (`--model-dir`, default nola-bench/ under
$XDG_CACHE_HOME, else ~/.cache). The project's own training entry then runs one optimizer step on it with the recipe
(default recipes/70b.yaml: nf4, double quant, bf16 compute and quant storage, bf16 mixed precision):

    python train_llama.py RECIPE model.name_or_path=DIR ...                                   (one process)
    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes N train_llama.py RECIPE ...
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes N train_llama.py RECIPE ...

No project file is edited: the runs get a generated `sitecustomize.py` (a temporary directory on PYTHONPATH, active
only in processes whose script is train_llama.py and only with NOLA_BENCH_MARKS set) that wraps
`nola.modeling.load_model`, `nola.training.fsdp.load_sharded_model` and `Accelerator.prepare`. Each rank
records, from /proc/self/status, VmRSS / RssAnon / RssFile / VmHWM when the load is entered (the rank's own baseline: libraries imported, data tokenised, process
group up, no weight yet), when it returns, when prepare returns and at exit; a thread samples the same fields every
5 ms in between, so each phase has its own peak. VmHWM (exact, kernel-kept) also counts the file-backed pages of
the memory-mapped safetensors checkpoint, which on a GPU would be host RAM, not device memory; the anonymous
peak (RssAnon, sampled) is the figure that stands for the 4-bit weights a GPU would hold. A separate process that
imports the same libraries and loads nothing gives the plain import baseline. The 4-bit bytes of the model (packed
weights + quantisation state + the unquantised rest) are counted on the loaded model itself; after prepare, the
bytes each ZeRO-3 rank owns (its partitions) are counted too; an FSDP2 rank's are its local shards from the start.
The 5 ms sampling can miss the briefest transients (a quantisation chunk lives a few ms), so the sampled peaks are
lower bounds.

For RSS to follow live memory, the runs set MALLOC_MMAP_THRESHOLD_=65536 (glibc otherwise keeps freed tensors in
its heaps, so RSS never falls after a partition is freed and depends on allocation order) and OMP_NUM_THREADS=1 (as
torchrun gives each rank). Quantising on CPU goes through bitsandbytes' torch reference kernel, whose float32
temporaries make the CPU load transient several times what a GPU load holds (nola's lean load quantises 4M
weights at a time to bound it); the resident 4-bit
model after load, and its fate at prepare, are the same on both. `--ds-set KEY=VALUE` overrides `zero_optimization`
keys of recipes/deepspeed/zero3.json (e.g. stage3_max_live_parameters) to see what the ranks re-gather per step.

Prints a table and a JSON object (also written to --out, atomically). The JSON records the command that wrote it
and no path of the machine that ran it (the model directory is MODEL_DIR, ../shared/data stays relative): it is a
committed artefact. Not part of the test run: the committed one took about 13 minutes on 2 cores (five runs of
2-3 minutes each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipe_runs import ROOT as REPO_ROOT
from recipe_runs import SHARED as SHARED_DATA  # ../shared/data beside the checkout
from recipe_runs import command_line, portable_path, write_json

TINY = SHARED_DATA / "stories260K-hf"  # tokenizer (vocab 512) for the wide random model
ALPACA = SHARED_DATA / "alpaca" / "alpaca_subset.json"
MIB = 2**20
GIB = 2**30

# The generated sitecustomize.py. It must not import anything heavy unless it is in a training process.
HOOK = r'''
import json, os, sys, threading, time

_MARKS = os.environ.get("NOLA_BENCH_MARKS")
_ACTIVE = bool(_MARKS) and os.path.basename(sys.argv[0] if sys.argv else "") == "train_llama.py"
_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status():
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in _FIELDS:
                values[key] = int(rest.split()[0]) * 1024  # kB -> bytes
    return values


class _Sampler:
    def __init__(self):
        self.phase, self.peaks, self.lock = None, {}, threading.Lock()

    def start(self, phase):
        with self.lock:
            self.phase = phase
            self.peaks.setdefault(phase, {})
        if not getattr(self, "thread", None):
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def switch(self, phase):
        """Close the current phase (one last sample) and open the next; returns the closed phase's peaks."""
        self._sample()
        with self.lock:
            closed = dict(self.peaks.get(self.phase, {}))
            self.phase = phase
            if phase is not None:
                self.peaks.setdefault(phase, {})
        return closed

    def _sample(self):
        now = _status()
        with self.lock:
            if self.phase is None:
                return
            peaks = self.peaks[self.phase]
            for key, value in now.items():
                if key != "VmHWM" and value > peaks.get(key, 0):
                    peaks[key] = value

    def _run(self):
        while True:
            self._sample()
            time.sleep(0.005)


def _rank():
    return int(os.environ.get("RANK", "0"))


def _write(event, **extra):
    record = {"event": event, "rank": _rank(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "pid": os.getpid(), "t": time.time(), **_status(), **extra}
    with open(_MARKS, "a") as marks:
        marks.write(json.dumps(record) + "\n")


def _tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


def _quant_state_bytes(state):
    if state is None:
        return 0
    total = sum(_tensor_bytes(getattr(state, name, None)) for name in ("absmax", "code", "offset"))
    return total + _quant_state_bytes(getattr(state, "state2", None))


def _model_bytes(model):
    """Bytes the model holds on this rank: packed 4-bit weights, their quantisation state, the other tensors; and,
    for ZeRO-3 parameters, the partition this rank owns (ds_tensor)."""
    import torch
    seen, four_bit, quant_state, other, owned = set(), 0, 0, 0, 0
    tensors = [*model.parameters(), *model.buffers()]
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state = getattr(tensor, "quant_state", None)
        ds_tensor = getattr(tensor, "ds_tensor", None)
        if ds_tensor is not None:
            owned += _tensor_bytes(ds_tensor)
        if hasattr(tensor, "to_local"):  # an FSDP2 shard: this rank holds its local part only
            owned += _tensor_bytes(tensor.to_local())
            tensor = tensor.to_local()
        if state is not None:
            four_bit += _tensor_bytes(tensor)
            quant_state += _quant_state_bytes(state)
        else:
            other += _tensor_bytes(tensor)
    # bitsandbytes keeps a second reference to the state on the Linear4bit module; counted once above.
    return {"packed_4bit_bytes": four_bit, "quant_state_bytes": quant_state, "other_bytes": other,
            "model_bytes": four_bit + quant_state + other, "zero3_owned_bytes": owned}


if _ACTIVE:
    import atexit

    import accelerate
    import nola.modeling
    import nola.training.fsdp

    _sampler = _Sampler()
    _prepare = accelerate.Accelerator.prepare

    def _measured(load):
        """A loader (plain or the sharded FSDP2 one) that opens the load phase and records the model it built."""
        def measured_load(*args, **kwargs):
            _write("load_start")
            _sampler.start("load")
            model = load(*args, **kwargs)
            _write("load_end", peaks=_sampler.switch("attach"), **_model_bytes(model))
            return model
        return measured_load

    def prepare(self, *args, **kwargs):
        peaks = _sampler.switch("prepare")
        _write("prepare_start", peaks=peaks)
        prepared = _prepare(self, *args, **kwargs)
        objects = prepared if isinstance(prepared, tuple) else (prepared,)
        model = next((m for m in objects if hasattr(m, "named_modules")), None)  # FSDP2: only the optimizer
        model = getattr(model, "module", model)
        _write("prepare_end", peaks=_sampler.switch("train"), **(_model_bytes(model) if model is not None else {}))
        return prepared

    nola.modeling.load_model = _measured(nola.modeling.load_model)
    nola.training.fsdp.load_sharded_model = _measured(nola.training.fsdp.load_sharded_model)
    accelerate.Accelerator.prepare = prepare

    @atexit.register
    def _at_exit():
        if _sampler.phase is not None:
            _write("exit", peaks=_sampler.switch(None))
'''

BASELINE = (
    "import json, accelerate, bitsandbytes, deepspeed, torch, transformers, transformers.models.llama, "
    "nola.training.recipe, nola.modeling\n"
    "from accelerate import Accelerator\n"
    "status = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
    "if l.split(':')[0] in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')}\n"
    "print(json.dumps(status))\n"
)


# RSS must follow live memory: glibc's malloc otherwise keeps freed blocks (a tensor freed after quantising, a
# partition freed by ZeRO-3) in its heaps, and raises its mmap threshold as blocks are freed, so RSS never drops and
# the figures depend on allocation order. A fixed 64 KiB threshold puts every tensor in its own mapping, returned on
# free. One thread per process, as torchrun gives every rank, so the one-process run allocates the same way.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "TOKENIZERS_PARALLELISM": "false", **ALLOCATOR, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, heads: int, dtype: str) -> dict:
    """A random LLaMA (the stories260K tokenizer, vocab 512) saved once as safetensors; reused when present."""
    settings = dict(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    stamp = directory / "bench-settings.json"
    wanted = {**settings, "dtype": dtype}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return wanted
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.time()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**settings))
    model.to_empty(device="cpu")
    with torch.no_grad():  # plain normal(0, 0.02) weights, unit norms: random, but a valid LLaMA
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0) if "norm" in name else parameter.normal_(0.0, 0.02)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (TINY / name).exists():
            shutil.copy(TINY / name, directory / name)
    stamp.write_text(json.dumps(wanted))
    print(f"built {directory} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {dtype}) "
          f"in {time.time() - started:.0f}s", flush=True)
    return wanted


def overrides(model_dir: Path, output_dir: Path, args) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.path={ALPACA}", "train.max_steps=1", "train.grad_accum_steps=1",
            "train.micro_batch_size=1", f"data.source_max_len={args.tokens}", f"data.target_max_len={args.tokens}",
            "data.validation_size=2", "train.eval_max_batches=1", "train.sample_generations=0", "mmlu.path=null",
            "log.wandb_mode=disabled", f"adapter.num_basis={args.num_basis}", f"train.output_dir={output_dir}",
            *args.override]


def zero3_config(work: Path, settings: list[str]) -> Path:
    """recipes/accelerate/zero3.yaml, or a copy whose DeepSpeed JSON has `zero_optimization` keys overridden
    (`--ds-set stage3_max_live_parameters=1e6`: what the ranks keep gathered during the step)."""
    if not settings:
        return REPO_ROOT / "recipes" / "accelerate" / "zero3.yaml"
    config = json.loads((REPO_ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())
    for setting in settings:
        key, _, value = setting.partition("=")
        config["zero_optimization"][key] = json.loads(value) if value[:1] in "[{\"tn" else int(float(value))
    (work / "zero3.json").write_text(json.dumps(config))
    accelerate = (REPO_ROOT / "recipes" / "accelerate" / "zero3.yaml").read_text()
    (work / "zero3.yaml").write_text(accelerate.replace("recipes/deepspeed/zero3.json", str(work / "zero3.json")))
    return work / "zero3.yaml"


def run_training(label: str, processes: int, hook_dir: Path, work: Path, model_dir: Path, args) -> dict:
    marks = work / f"{label}.marks.jsonl"
    output_dir = work / f"{label}-run"
    command = [sys.executable, "train_llama.py", args.recipe, *overrides(model_dir, output_dir, args)]
    engine = label.split("-")[0]
    if engine != "single":
        config = zero3_config(work, args.ds_set) if engine == "zero3" else REPO_ROOT / "recipes/accelerate/fsdp.yaml"
        command[1:2] = ["-m", "accelerate.commands.launch", "--config_file", str(config),
                        "--num_processes", str(processes), "--main_process_port", str(free_port()), "train_llama.py"]
    started = time.time()
    print(f"[{label}] {' '.join(command[1:])}", flush=True)
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout,
                               env=environment(NOLA_BENCH_MARKS=str(marks),
                                               PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO_ROOT)])))
    seconds = time.time() - started
    if completed.returncode != 0:
        raise SystemExit(f"[{label}] failed ({completed.returncode}):\n{completed.stdout[-2000:]}\n"
                         f"{completed.stderr[-4000:]}")
    records = [json.loads(line) for line in marks.read_text().splitlines()]
    ranks = {}
    for rank in sorted({r["rank"] for r in records}):
        events = {r["event"]: r for r in records if r["rank"] == rank}
        ranks[rank] = summarise(events)
    print(f"[{label}] done in {seconds:.0f}s", flush=True)
    return {"processes": processes, "seconds": round(seconds, 1), "ranks": ranks}


def summarise(events: dict) -> dict:
    """Per rank, in MiB: its baseline at load start, the peaks of each phase, and (peak - baseline)."""
    start, load, prepare, end = (events[name] for name in ("load_start", "load_end", "prepare_end", "exit"))
    base_anon, base_rss = start["RssAnon"], start["VmRSS"]

    def mib(value):
        return round(value / MIB, 1)

    load_peaks, train_peaks = load["peaks"], end["peaks"]
    prepare_peaks = prepare["peaks"]
    return {
        "baseline_rss_mib": mib(base_rss), "baseline_anon_mib": mib(base_anon),
        "load_peak_anon_mib": mib(load_peaks["RssAnon"]),
        "load_peak_anon_minus_baseline_mib": mib(load_peaks["RssAnon"] - base_anon),
        "load_peak_hwm_mib": mib(load["VmHWM"]), "load_peak_hwm_minus_baseline_mib": mib(load["VmHWM"] - base_rss),
        "load_peak_file_mib": mib(load_peaks["RssFile"]),
        "after_load_anon_minus_baseline_mib": mib(load["RssAnon"] - base_anon),
        "prepare_peak_anon_minus_baseline_mib": mib(prepare_peaks.get("RssAnon", 0) - base_anon),
        "after_prepare_anon_minus_baseline_mib": mib(prepare["RssAnon"] - base_anon),
        "first_step_peak_anon_minus_baseline_mib": mib(train_peaks["RssAnon"] - base_anon),
        "after_first_step_anon_minus_baseline_mib": mib(end["RssAnon"] - base_anon),
        "exit_hwm_mib": mib(end["VmHWM"]),
        "model_bytes_after_load": load["model_bytes"], "packed_4bit_bytes": load["packed_4bit_bytes"],
        "quant_state_bytes": load["quant_state_bytes"], "other_bytes": load["other_bytes"],
        "zero3_owned_bytes_after_prepare": prepare.get("zero3_owned_bytes", 0),
    }


def dry_run_estimate(model_dir: Path, args) -> dict:
    completed = subprocess.run(
        [sys.executable, "train_llama.py", args.recipe, *overrides(model_dir, Path(tempfile.gettempdir()), args),
         "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment(), check=True)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    keys = ("memory_per_gpu", "zero3_gpu_memory_gib", "zero3_load_peak_gib", "zero3_fit_gib",
            "fsdp_load_peak_gib", "fsdp_step_peak_gib", "fsdp_cpu_kernels_load_peak_gib",
            "fsdp_cpu_kernels_step_peak_gib")
    return {key: report[key] for key in keys if key in report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/70b.yaml")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--checkpoint-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random checkpoint is kept (default ~/.cache/nola-bench/wide-llama-...)")
    parser.add_argument("--tokens", type=int, default=32, help="data.source_max_len and data.target_max_len")
    parser.add_argument("--num-basis", type=int, default=64, help="adapter.num_basis (step time only)")
    parser.add_argument("--processes", default="2,4", help="process counts of the sharded runs (a plain one-process run "
                        "is always made)")
    parser.add_argument("--engines", default="fsdp,zero3", help="sharded engines to run: fsdp (recipes/accelerate/"
                        "fsdp.yaml, the lean load), zero3 (recipes/accelerate/zero3.yaml)")
    parser.add_argument("--sharded-single", action="store_true", help="also run each engine with one process")
    parser.add_argument("--override", action="append", default=[], help="extra dotted.key=value for the runs")
    parser.add_argument("--ds-set", action="append", default=[],
                        help="override a zero_optimization key of recipes/deepspeed/zero3.json, e.g. "
                             "stage3_max_live_parameters=1e6 (repeatable)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()

    name = f"wide-llama-L{args.layers}-H{args.hidden}-I{args.intermediate}-{args.checkpoint_dtype}"
    model_dir = args.model_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nola-bench" / name
    settings = build_checkpoint(model_dir, args.layers, args.hidden, args.intermediate, args.heads,
                                args.checkpoint_dtype)
    results: dict = {"command": command_line(), "model_dir": name, "model": settings,
                     "recipe": portable_path(args.recipe),
                     "overrides": [portable_path(o.replace(str(model_dir), "MODEL_DIR"))
                                   for o in overrides(model_dir, Path("OUTPUT"), args)], "environment": ALLOCATOR,
                     "zero3_settings": args.ds_set, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="nola-load-memory-") as work:
        work = Path(work)
        hook_dir = work / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        baseline = subprocess.run([sys.executable, "-c", BASELINE], cwd=REPO_ROOT, capture_output=True, text=True,
                                  env=environment(), check=True, timeout=300)
        status = json.loads(baseline.stdout.strip().splitlines()[-1])
        results["import_baseline_mib"] = {key: round(value / MIB, 1) for key, value in status.items()}
        results["dry_run"] = dry_run_estimate(model_dir, args)
        runs = [("single-1", 1)] + [(f"{engine}-{n}", n) for engine in args.engines.split(",")
                                     for n in map(int, args.processes.split(",")) if n > 1 or args.sharded_single]
        for label, processes in runs:
            results["runs"][label] = run_training(label, processes, hook_dir, work, model_dir, args)

    results["checks"] = fsdp_checks(results)
    print_table(results)
    print(json.dumps(results))
    if args.out:
        write_json(args.out, results)
    return 0


def fsdp_checks(results: dict) -> dict:
    """For every FSDP run: each rank's load peak against the bound (4-bit model)/N + one dense bf16 decoder layer +
    the quantisation constants, + 15%; each rank's step peak against the one-process step peak; and both against
    the --dry-run estimate with CPU kernels (MiB above each process's own start)."""
    model = results["model"]
    single = next(iter(results["runs"]["single-1"]["ranks"].values()))
    dense_layer = 2 * (4 * model["hidden_size"] ** 2 + 3 * model["hidden_size"] * model["intermediate_size"])
    dry = results.get("dry_run", {})
    checks = {}
    for label, run in results["runs"].items():
        if not label.startswith("fsdp"):
            continue
        n = run["processes"]
        ranks = list(run["ranks"].values())
        bound = (single["model_bytes_after_load"] / n + dense_layer + single["quant_state_bytes"]) * 1.15 / MIB
        load = max(r["load_peak_anon_minus_baseline_mib"] for r in ranks)
        step = max(r["first_step_peak_anon_minus_baseline_mib"] for r in ranks)
        estimate_load = dry.get("fsdp_cpu_kernels_load_peak_gib", {}).get(str(n))
        estimate_step = dry.get("fsdp_cpu_kernels_step_peak_gib", {}).get(str(n))
        checks[label] = {
            "load_peak_mib": load, "load_bound_mib": round(bound, 1), "load_within_bound": load <= bound,
            "step_peak_mib": step, "single_step_peak_mib": single["first_step_peak_anon_minus_baseline_mib"],
            "step_below_single": step < single["first_step_peak_anon_minus_baseline_mib"],
            "dry_run_load_mib": round(estimate_load * 1024, 1) if estimate_load is not None else None,
            "dry_run_step_mib": round(estimate_step * 1024, 1) if estimate_step is not None else None,
        }
        for phase in ("load", "step"):
            estimate = checks[label][f"dry_run_{phase}_mib"]
            if estimate is not None:
                checks[label][f"dry_run_{phase}_over_measured"] = round(estimate / checks[label][f"{phase}_peak_mib"], 3)
    return checks


def print_table(results: dict) -> None:
    first = next(iter(next(iter(results["runs"].values()))["ranks"].values()))
    model_mib = first["model_bytes_after_load"] / MIB
    print(f"\nmodel: {results['model']}\n4-bit model on each rank after load: {model_mib:.1f} MiB "
          f"(packed 4-bit {first['packed_4bit_bytes'] / MIB:.1f} + quant state {first['quant_state_bytes'] / MIB:.1f}"
          f" + other {first['other_bytes'] / MIB:.1f}); import-only process: "
          f"{results['import_baseline_mib']['VmRSS']:.0f} MiB RSS")
    dry = results.get("dry_run", {}).get("memory_per_gpu", {})
    if dry:
        print(f"--dry-run estimate of the weights for this model: {dry['weights_gib'] * 1024:.1f} MiB")
    header = ("run", "rank", "baseline", "load peak", "load peak", "after load", "after prepare", "owned after",
              "step peak", "after step")
    sub = ("", "", "RSS", "anon - base", "HWM - base", "anon - base", "anon - base", "prepare", "anon - base",
           "anon - base")
    rows = [header, sub]
    for label, run in results["runs"].items():
        for rank, r in run["ranks"].items():
            owned = r["zero3_owned_bytes_after_prepare"]
            figures = [r[key] for key in ("baseline_rss_mib", "load_peak_anon_minus_baseline_mib",
                                          "load_peak_hwm_minus_baseline_mib", "after_load_anon_minus_baseline_mib",
                                          "after_prepare_anon_minus_baseline_mib")]
            figures += [owned / MIB if owned else None, r["first_step_peak_anon_minus_baseline_mib"],
                        r["after_first_step_anon_minus_baseline_mib"]]
            rows.append((label, str(rank), *("-" if value is None else f"{value:.0f}" for value in figures)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("(MiB per process; 'base' = that process's own RSS when load_model is entered)")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    for label, check in results["checks"].items():
        print(f"{label}: load peak {check['load_peak_mib']:.0f} MiB (bound {check['load_bound_mib']:.0f}: "
              f"{'within' if check['load_within_bound'] else 'OVER'}), step peak {check['step_peak_mib']:.0f} MiB "
              f"(one process {check['single_step_peak_mib']:.0f}); --dry-run (CPU kernels) / measured: load "
              f"{check.get('dry_run_load_over_measured')}, step {check.get('dry_run_step_over_measured')}")
    print()


if __name__ == "__main__":
    sys.exit(main())
