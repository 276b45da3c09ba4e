"""The training loop: a plain PyTorch loop on accelerate, from a validated recipe to an adapter.

    recipe -> tokenizer + data -> base model (4-bit) -> attach adapter -> loop (accumulate, clip, step, schedule)
           -> metrics.jsonl / W&B, checkpoints/step-N, adapter/, run.json

The loss of an optimizer step is the mean over every response token of its global batch (all micro-batches, all
ranks): each micro-batch contributes its summed token loss divided by the global token count, so gradients do not
depend on how the batch is split across micro-batches or processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from nola import embedded
from nola.adapter_io import save_adapter
from nola.answer_accuracy import answer_accuracy, format_answer_accuracy
from nola.checkpoint import (
    capture_rng,
    gather_training_state,
    latest_valid_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_unfinished,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from nola.config import RecipeConfig
from nola.data import batch_schedule, collate, load_records, prepare_data
from nola.errors import NolaError
from nola.evaluation import evaluate, token_loss_sum
from nola.failpoints import armed, kill_if_armed
from nola.fused import requested_backend
from nola.inject import (
    attach,
    record_mixed_precision,
    discard_deferred_gradients,
    parameter_report,
    project_deferred_gradients,
    set_deferred_projection,
)
from nola.merge import checkpoint_shards
from nola.mmlu import load_mmlu, mmlu_accuracy
from nola.modeling import autocast_forward, check_model_source, load_model, load_tokenizer
from nola.preflight import check_architecture, check_data, check_resume, lock_output_dir
from nola.run_log import RunLog
from nola.stop_signals import Preempted, StopSignals


def _label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class StepBatches:
    """An endless, resumable stream of this rank's micro-batches, one optimizer step at a time: epoch after epoch
    of `batch_schedule`. Its position (epoch, step within the epoch) is all a checkpoint needs to continue exactly,
    on any split of the same global batch."""

    def __init__(self, examples, micro_batch_size, grad_accum_steps, seed, group_by_length, num_replicas, rank,
                 pad_token_id) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.settings = dict(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, seed=seed,
                             group_by_length=group_by_length, num_replicas=num_replicas, rank=rank)
        self.global_batch = micro_batch_size * grad_accum_steps * num_replicas
        self.pad_token_id = pad_token_id
        self.epoch, self.index = 0, 0
        self._schedule = self._epoch_schedule(0)

    def _epoch_schedule(self, epoch: int) -> list[list[list[int]]]:
        schedule = batch_schedule(self.lengths, epoch=epoch, **self.settings)
        if not schedule:
            raise NolaError(f"data: {len(self.examples)} training examples do not fill one global batch of "
                            f"{self.global_batch} (micro_batch_size x grad_accum_steps x processes)")
        return schedule

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._schedule = self._epoch_schedule(epoch)

    def next(self) -> list[dict[str, torch.Tensor]]:
        if self.index >= len(self._schedule):
            self.seek(self.epoch + 1, 0)
        micro_batches = self._schedule[self.index]
        self.index += 1
        return [collate([self.examples[i] for i in indices], self.pad_token_id) for indices in micro_batches]


def make_accelerator(config: RecipeConfig):
    """accelerate's Accelerator for this launch. Without CUDA, plain multi-process launches run as CPU processes over
    gloo (`cpu=True`); DeepSpeed launches keep their engine (DeepSpeed has a CPU accelerator), with the batch,
    accumulation and clipping its JSON leaves as "auto" filled from the recipe."""
    from accelerate import Accelerator

    if not deepspeed_launch():
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision)
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if not torch.cuda.is_available():
        # accelerate 1.15 only picks gloo for CPU processes when cpu=True, which turns DeepSpeed off; naming the
        # backend first keeps DeepSpeed and still gives every process its rank (else each believes it is alone).
        PartialState(backend="gloo")
    plugin = DeepSpeedPlugin(gradient_accumulation_steps=config.train.grad_accum_steps,
                             gradient_clipping=config.train.max_grad_norm)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train.micro_batch_size
    plugin.deepspeed_config["train_batch_size"] = (
        config.train.micro_batch_size * config.train.grad_accum_steps * world_size
    )
    # The engine runs in fp32 and the forward under autocast (`autocast_forward`), not in DeepSpeed's bf16 mode: that
    # mode casts every float parameter, so A = A0 + Σ αᵢUᵢ would be formed from bf16 coefficients (a 14% error on
    # the first update) and packed 4-bit storage of another float dtype would be converted, destroying it. Autocast
    # keeps parameters as they are and computes exactly as a DDP run does.
    return Accelerator(deepspeed_plugin=plugin, mixed_precision="no",
                       gradient_accumulation_steps=config.train.grad_accum_steps)


def deepspeed_launch() -> bool:
    """Whether accelerate launched this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_precision(config: RecipeConfig) -> None:
    """Refuse, before any weight loads, the precision settings a DeepSpeed run cannot honour: fp16 needs loss scaling,
    which DeepSpeed does only in its own fp16 mode, and that mode casts the NOLA coefficients to fp16."""
    if deepspeed_launch() and config.train.mixed_precision == "fp16":
        raise NolaError("train.mixed_precision: fp16 is not supported under DeepSpeed (its fp16 mode casts the "
                        "adapter's float32 parameters to fp16); use bf16, or fp16 without DeepSpeed")


def check_trainable_dtypes(model) -> None:
    """Every trainable tensor must still be float32 (float64 on a float64 base) after the engine wrapped the model: an
    engine that cast them (a DeepSpeed JSON with bf16 or fp16 "enabled": true rather than "auto") would train
    bf16-rounded coefficients, silently."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype not in (torch.float32, torch.float64):
            raise NolaError(f"train: {name} is {str(parameter.dtype).split('.')[-1]} after the engine's set-up: the "
                            f"DeepSpeed config casts parameters; leave its bf16/fp16 \"enabled\" at \"auto\" (nola "
                            f"autocasts the forward and keeps the adapter in float32)")


def accumulation_context(accelerator, model, use_deepspeed: bool, deferred: bool, last_micro_batch: bool):
    """Gradients are reduced across ranks on a step's last micro-batch only. DeepSpeed decides its optimizer step
    from accelerate's sync flag, which `accumulate` sets on every grad_accum_steps-th call (left alone, the flag stays
    on and DeepSpeed would step after every micro-batch); DDP skips the all-reduce under `no_sync`. With deferred
    projection the coefficient gradients only exist after `project_deferred_gradients`, so DDP never syncs and
    `average_gradients` reduces them instead."""
    if use_deepspeed:
        return accelerator.accumulate(model)
    return nullcontext() if last_micro_batch and not deferred else accelerator.no_sync(model)


def use_deferred_projection(config: RecipeConfig, model, use_deepspeed: bool, is_main: bool) -> bool:
    """Turn on deferred projection for the NOLA layers when the recipe asks and the loop owns the backward. DeepSpeed
    runs backward and the optimizer step inside its engine, with no point between them to project: there the layers
    keep projecting per micro-batch, and the log says so."""
    if not config.train.deferred_projection or config.adapter.method != "nola":
        return False
    if use_deepspeed:
        if is_main:
            print("nola: train.deferred_projection is not available under DeepSpeed (its engine owns backward and "
                  "step): projecting NOLA gradients per micro-batch")
        return False
    return set_deferred_projection(model, True) > 0


def average_gradients(accelerator, parameters: list[torch.Tensor]) -> None:
    """Average `.grad` over ranks in one all-reduce, as DDP would: for the deferred path, whose coefficient gradients
    appear after backward. A NOLA adapter's gradients are kilobytes, far less traffic than LoRA's."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    flat = accelerator.reduce(flat, reduction="mean")
    for parameter, gradient in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad = gradient.view_as(parameter)


def make_optimizer(parameters, config: RecipeConfig) -> torch.optim.Optimizer:
    """AdamW over the adapter's fp32 parameters, or bitsandbytes' paged AdamW (CUDA only)."""
    if config.train.optimizer == "paged_adamw":
        if not torch.cuda.is_available():
            raise NolaError("train.optimizer: paged_adamw needs a CUDA device; use adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)


def make_scheduler(optimizer, config: RecipeConfig):
    """Warm-up over warmup_ratio of the steps, then constant, linear decay or cosine decay."""
    from transformers import get_scheduler

    names = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        names[config.train.lr_scheduler],
        optimizer,
        num_warmup_steps=math.ceil(config.train.warmup_ratio * config.train.max_steps),
        num_training_steps=config.train.max_steps,
    )


def resolve_resume(config: RecipeConfig, checkpoints_dir: Path, accelerator) -> Path | None:
    """The checkpoint to resume from: `auto` picks the newest valid one (or none), a path must verify. Rank 0
    decides and tells the others, so all ranks resume from the same step even if a checkpoint changes meanwhile."""
    resume = config.train.resume_from
    if resume is None:
        return None
    if resume != "auto":
        verify_checkpoint(Path(resume))
        return Path(resume)
    from accelerate.utils import broadcast_object_list

    choice = [latest_valid_checkpoint(checkpoints_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0]


def data_fingerprint(config: RecipeConfig, stream: "StepBatches") -> dict:
    """What fixes the order of training examples: a checkpoint resumes exactly only on the same."""
    return {"global_batch": stream.global_batch, "seed": config.train.seed,
            "group_by_length": config.data.group_by_length, "train_examples": len(stream.examples)}


def agreed_flags(accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any rank, the same answer on every rank (one small all-reduce), so that all ranks take
    the same branch at a stop request or a non-finite loss."""
    local = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    return [bool(value > 0) for value in accelerator.reduce(local, reduction="sum").tolist()]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def sample_generations(model, tokenizer, examples, count: int, max_new_tokens: int,
                       interrupt: Callable[[], None] | None = None) -> list[dict[str, str]]:
    """Greedy completions of the first `count` validation prompts, beside their reference responses. `interrupt`
    runs before each prompt (it raises to stop early)."""
    model.eval()
    samples = []
    for example in examples[:count]:
        if interrupt is not None:
            interrupt()
        prompt_length = example["prompt_length"]
        prompt = torch.tensor([example["input_ids"][:prompt_length]], device=model.device)
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        samples.append({
            "prompt": tokenizer.decode(prompt[0], skip_special_tokens=True)[-120:],
            "reference": tokenizer.decode(example["input_ids"][prompt_length:], skip_special_tokens=True),
            "generated": tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True),
        })
    model.train()
    return samples


def _print_samples(title: str, samples: list[dict[str, str]]) -> None:
    print(f"--- generations {title} ---")
    for sample in samples:
        print(f"... {sample['prompt']!r}\n    reference: {sample['reference']!r}\n"
              f"    generated: {sample['generated']!r}")


class StopRequested(Exception):
    """A stop signal that every rank agreed on during eval, MMLU or sample generation (between two batches)."""


def skip_update(optimizer, scaler, unscaled: bool) -> None:
    """Leave the parameters as they are for a step whose loss or gradient is not finite. Under fp16 loss scaling the
    GradScaler must still see the step end: `unscale_` (run by gradient clipping) opened it, and only `update()`
    closes it, backing the scale off so the next step can be finite; skipped, the next clip would raise
    "unscale_() has already been called"."""
    if scaler is not None and unscaled:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def run(config: RecipeConfig) -> dict:
    """Train the recipe; returns the run summary (also written to output_dir/run.json on rank 0). Raises
    `Preempted` after checkpointing when SIGTERM / SIGUSR1 arrives (in a step, an eval, MMLU or sampling)."""
    accelerator = make_accelerator(config)
    is_main = accelerator.is_main_process
    train = config.train
    output_dir = Path(train.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    resume_dir = resolve_resume(config, checkpoints_dir, accelerator)

    # Everything that can be checked before a weight is loaded, and before anything is written.
    requested_backend()
    check_precision(config)
    if not config.model.name_or_path.startswith(embedded.PREFIX):
        if Path(check_model_source(config.model.name_or_path)).is_dir():
            checkpoint_shards(Path(config.model.name_or_path))  # safetensors weights only: refuse .bin pickles now
    with accelerator.main_process_first():  # rank 0 builds the embedded default once; the others then reuse it
        records = load_records(embedded.resolve(config.data.path))
        model_section = dataclasses.replace(config.model, name_or_path=embedded.resolve(config.model.name_or_path))
        mmlu_examples = load_mmlu(config.mmlu.path, config.mmlu.shots) if config.mmlu.path else []
    mmlu_examples = mmlu_examples[: config.mmlu.max_examples]
    tokenizer = load_tokenizer(model_section, config.data.tokenizer)
    pad_token_id = tokenizer.pad_token_id
    data = prepare_data(
        records, tokenizer, config.data.source_max_len, config.data.target_max_len,
        config.data.validation_size, train.seed, config.data.train_on_source,
    )
    check_data(config, data, len(records))
    skeleton = check_architecture(config, model_section)
    stream = StepBatches(data.train, train.micro_batch_size, train.grad_accum_steps, train.seed,
                         config.data.group_by_length, accelerator.num_processes, accelerator.process_index,
                         pad_token_id)
    fingerprint = data_fingerprint(config, stream)
    if resume_dir is not None:
        saved = read_trainer_state(resume_dir)
        # Checkpoints written before the data fingerprint existed record the global batch alone.
        check_resume(resume_dir, config, skeleton, fingerprint,
                     saved.get("data", {"global_batch": saved.get("global_batch")}))
    run_lock = lock_output_dir(output_dir, accelerator)  # noqa: F841  (held, open, until the process ends)
    if is_main:
        remove_unfinished(checkpoints_dir)

    model = load_model(model_section, accelerator.device, train.mixed_precision)
    attach(model, config.adapter_config())
    record_mixed_precision(model, train.mixed_precision)
    report = parameter_report(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    scheduler = make_scheduler(optimizer, config)
    if deepspeed_launch():  # accelerate autocasts plain and DDP runs itself; see make_accelerator
        autocast_forward(model, train.mixed_precision, accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    use_deepspeed = accelerator.distributed_type == "DEEPSPEED"
    unwrapped = accelerator.unwrap_model(model)
    check_trainable_dtypes(unwrapped)
    deferred = use_deferred_projection(config, unwrapped, use_deepspeed, is_main)
    scaler = getattr(accelerator, "scaler", None)  # fp16 loss scaling (CUDA, without DeepSpeed)

    start_step, tokens_seen, first_eval, eval_loss = 0, 0, None, None
    nonfinite_steps, nonfinite_in_a_row = 0, 0
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, unwrapped, optimizer, scheduler, use_deepspeed)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        first_eval, eval_loss = state.get("first_eval_loss"), state["eval_loss"]
        nonfinite_steps, nonfinite_in_a_row = state.get("nonfinite_steps", 0), state.get("nonfinite_in_a_row", 0)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        stream.seek(state["epoch"], state["step_in_epoch"])

    log = RunLog(output_dir, config.log, config.to_dict(), enabled=is_main, resumed_step=start_step or None)
    log.summary(report)
    if is_main:
        print(json.dumps({"parameters": report, "train_examples": len(data.train),
                          "validation_examples": len(data.validation), "dropped_records": data.dropped,
                          "resumed_from": str(resume_dir) if resume_dir else None,
                          "distributed_type": str(accelerator.distributed_type), "processes": accelerator.num_processes,
                          "device": str(accelerator.device), "deferred_projection": deferred,
                          "mixed_precision": train.mixed_precision}))
    stop = StopSignals()

    def interrupt() -> None:
        """Called between the batches of eval, MMLU and sampling: a stop request is honoured there too, within
        seconds, not after the whole evaluation (a scheduler's grace period is short)."""
        if armed("signal-in-eval", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if agreed_flags(accelerator, stop.received is not None)[0]:
            raise StopRequested

    def evaluate_now() -> float:
        if not data.validation:
            return float("nan")
        return evaluate(model, data.validation, train.micro_batch_size, pad_token_id, accelerator,
                        train.eval_max_batches, interrupt)

    def mmlu_now() -> dict:
        return mmlu_accuracy(model, tokenizer, mmlu_examples, config.mmlu.batch_size, config.mmlu.max_length,
                             accelerator, interrupt)

    def write_checkpoint(step: int, position: tuple[int, int], rng: dict, tokens: int) -> Path:
        """checkpoints/step-N on rank 0 from the state gathered on all (a collective: every rank calls it)."""
        directory = checkpoints_dir / f"step-{step}"
        training_state = gather_training_state(unwrapped, optimizer, use_deepspeed)
        if is_main:
            trainer_state = {"step": step, "epoch": position[0], "step_in_epoch": position[1], "data": fingerprint,
                             "tokens_seen": tokens, "eval_loss": eval_loss, "first_eval_loss": first_eval,
                             "nonfinite_steps": nonfinite_steps, "nonfinite_in_a_row": nonfinite_in_a_row,
                             "grad_scaler": scaler.state_dict() if scaler is not None else None}
            save_checkpoint(directory, unwrapped, training_state, scheduler, trainer_state, rng)
            rotate_checkpoints(checkpoints_dir, train.save_total_limit)
        accelerator.wait_for_everyone()
        return directory

    def answers() -> dict:
        """Exact-match accuracy of greedy answers on held-out records (per task family on the embedded set): what
        a user sees the adapter do, beside the eval loss. On every rank: under ZeRO-3 a forward is a collective."""
        if not (train.answer_accuracy and data.validation):
            return {}
        embedded_data = config.data.path.startswith(embedded.PREFIX)
        return answer_accuracy(unwrapped, tokenizer, data.validation[: train.answer_accuracy], None,
                               train.max_new_tokens, family_of=embedded.task_family if embedded_data else None,
                               answers_of=embedded.correct_answers if embedded_data else None)

    def samples() -> list[dict[str, str]]:
        if not (train.sample_generations and data.validation):
            return []
        # On every rank: under ZeRO-3 a forward is a collective.
        return sample_generations(unwrapped, tokenizer, data.validation, train.sample_generations,
                                  train.max_new_tokens, interrupt)

    from tqdm.auto import tqdm

    step = start_step
    progress = tqdm(total=train.max_steps, initial=start_step, disable=not is_main, desc="train", unit="step")
    try:
        if start_step == 0:
            first_eval = eval_loss = evaluate_now()
            log.log(0, {"eval_loss": first_eval, **(mmlu_now() if mmlu_examples and config.mmlu.at_start else {})})
        samples_before, answers_before = samples(), answers()
        model.train()
        window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.perf_counter()
        window_first_step = step
        # DDP and DeepSpeed average gradients over ranks, and DeepSpeed also divides each micro-batch's loss by its
        # accumulation count: undo both, so the step's gradient is that of the mean loss over its global tokens.
        gradient_scale = accelerator.num_processes * (train.grad_accum_steps if use_deepspeed else 1)
        while step < train.max_steps:
            position, rng = (stream.epoch, stream.index), capture_rng()  # the state a stop mid-step goes back to
            micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in stream.next()]
            local_counts = torch.tensor([sum(_label_tokens(b) for b in micro_batches),
                                         sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                                        device=accelerator.device)
            global_counts = accelerator.reduce(local_counts, reduction="sum").tolist()
            global_tokens = max(int(global_counts[0]), 1)
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            stopping = nonfinite = False
            for index, batch in enumerate(micro_batches):
                with accumulation_context(accelerator, model, use_deepspeed, deferred, index == len(micro_batches) - 1):
                    loss_sum, _ = token_loss_sum(model, batch)
                    if armed("nan-loss", step + 1):
                        loss_sum = loss_sum * float("nan")
                    stopping, nonfinite = agreed_flags(accelerator, stop.received is not None,
                                                       not bool(torch.isfinite(loss_sum)))
                    if stopping or nonfinite:
                        break
                    accelerator.backward(loss_sum * (gradient_scale / global_tokens))
                kill_if_armed("micro-batch", step + 1)
                step_loss += loss_sum.detach().double()
            if deferred and not (stopping or nonfinite):
                project_deferred_gradients(unwrapped)
                average_gradients(accelerator, parameters)
            elif deferred:
                discard_deferred_gradients(unwrapped)
            if stopping:  # parameters are still those of the last completed step: checkpoint them and leave
                optimizer.zero_grad(set_to_none=True)
                directory = write_checkpoint(step, position, rng, tokens_seen)
                log.close()
                raise Preempted(stop.received or "a signal on another rank", step, directory)
            loss_is_finite = not nonfinite
            grad_norm = (float("nan") if nonfinite
                         else float(accelerator.clip_grad_norm_(parameters, train.max_grad_norm)))
            nonfinite = nonfinite or not math.isfinite(grad_norm)
            if nonfinite and use_deepspeed:
                # DeepSpeed steps inside backward and counts micro-batches itself: a step cannot be skipped, only
                # stopped.
                raise NolaError(f"train: non-finite loss or gradient at step {step + 1} under DeepSpeed, which cannot "
                                f"skip a step; the last good state is the newest checkpoint in {checkpoints_dir}")
            if nonfinite:
                skip_update(optimizer, scaler, unscaled=loss_is_finite)
                nonfinite_steps += 1
                # An fp16 gradient overflow with a finite loss is the loss scaler calibrating, not a divergence.
                if not (scaler is not None and loss_is_finite):
                    nonfinite_in_a_row += 1
            else:
                optimizer.step()
                nonfinite_in_a_row = 0
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            tokens_seen += int(global_counts[1])
            window_seen += int(global_counts[1])
            if nonfinite:
                log.log(step, {"nonfinite_step": 1, "nonfinite_steps": nonfinite_steps})
                if nonfinite_in_a_row >= train.max_nonfinite_steps:
                    directory = write_checkpoint(step, (stream.epoch, stream.index), capture_rng(), tokens_seen)
                    raise NolaError(
                        f"train: {nonfinite_in_a_row} steps in a row (to step {step}) had a non-finite loss or "
                        f"gradient and were skipped; stopped with the last good state in {directory}: lower "
                        f"train.lr or check the data (train.max_nonfinite_steps={train.max_nonfinite_steps})")
            else:
                step_loss = accelerator.reduce(step_loss, reduction="sum").item() / global_tokens
                window_loss += step_loss * global_tokens
                window_tokens += global_tokens
                progress.set_postfix(loss=f"{step_loss:.4f}")

            if step % train.logging_steps == 0 or step == train.max_steps:
                elapsed = time.perf_counter() - window_start
                log.log(step, {
                    "loss": window_loss / window_tokens if window_tokens else float("nan"),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_seen / elapsed,
                    "seconds_per_step": elapsed / (step - window_first_step),
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                })
                window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.perf_counter()
                window_first_step = step
            if step % train.eval_steps == 0 or step == train.max_steps:
                eval_loss = evaluate_now()
                log.log(step, {"eval_loss": eval_loss})
            if step % train.save_steps == 0 or step == train.max_steps:
                write_checkpoint(step, (stream.epoch, stream.index), capture_rng(), tokens_seen)
        progress.close()

        summary = {"steps": step, "first_eval_loss": first_eval, "final_eval_loss": eval_loss,
                   "tokens_seen": tokens_seen, "nonfinite_steps": nonfinite_steps, **report}
        if mmlu_examples:
            scores = mmlu_now()
            summary.update(scores)
            log.log(step, scores)
        samples_after, answers_after = samples(), answers()
        if answers_after:
            summary.update(answers_after)
            summary["answer_accuracy_before"] = answers_before.get("answer_accuracy")
    except StopRequested:
        directory = write_checkpoint(step, (stream.epoch, stream.index), capture_rng(), tokens_seen) if step else None
        log.close()
        raise Preempted(stop.received or "a signal on another rank", step, directory) from None
    finally:  # also on the way out of an error: the progress bar must not print after it
        progress.close()
        stop.restore()

    final_values = gather_training_state(unwrapped, optimizer, use_deepspeed).values  # every rank: a collective
    if is_main:
        save_adapter(unwrapped, output_dir / "adapter", values=final_values)
        if samples_after:
            _print_samples("before training", samples_before)
            _print_samples("after training", samples_after)
        if answers_after:
            if answers_before:
                print(f"before training: {format_answer_accuracy(answers_before)}")
            print(f"after training:  {format_answer_accuracy(answers_after)}")
        (output_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.summary(summary)
    log.close()
    accelerator.wait_for_everyone()
    return summary
