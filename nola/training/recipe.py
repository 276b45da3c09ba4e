"""The fine-tuning recipe: a validated recipe in, an adapter out, as one class with named phases.

    setup()       plan (every check before a weight loads), base model + adapter, optimizer, scheduler, engine,
                  restore from a checkpoint, first eval
    train()       per optimizer step: accumulate its micro-batches -> stop? -> update (clip, step or skip)
                  -> periodic log / eval / save
    checkpoint()  checkpoints/step-N from the state declared on the object (`LoopState`)
    finish()      MMLU, answers and samples after training, the final adapter, run.json

The loss of an optimizer step is the mean over every response token of its global batch (all micro-batches, all
ranks): each micro-batch contributes its summed token loss divided by the global token count, so gradients do not
depend on how the batch is split across micro-batches or processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nola import embedded
from nola.adapter_io import residual_factors, save_adapter
from nola.answer_accuracy import answer_accuracy, format_answer_accuracy
from nola.data import collate, data_fingerprint
from nola.errors import NolaError
from nola.evaluation import evaluate, logits_loss_sum, token_loss_sum
from nola.inference import print_samples, sample_generations
from nola.inject import (
    adapted_modules,
    attach,
    discard_deferred_gradients,
    parameter_report,
    project_deferred_gradients,
    record_mixed_precision,
    record_prompt_template,
)
from nola.methods import method_for
from nola.mmlu import mmlu_accuracy
from nola.modeling import autocast, autocast_forward, load_model
from nola.training.checkpoint import capture_rng, gather_training_state, load_checkpoint, rotate_checkpoints
from nola.training.checkpoint import save_checkpoint as write_checkpoint
from nola.training.config import RecipeConfig, TrainSection
from nola.training.distributed import (
    accumulation_context,
    agreed_flags,
    average_gradients,
    check_trainable_dtypes,
    deepspeed_launch,
    global_token_counts,
    gradient_scale,
    make_accelerator,
    use_deferred_projection,
)
from nola.training.failpoints import armed, hold_if_armed, kill_if_armed
from nola.training.fsdp import fsdp_launch, load_sharded_model
from nola.training.optim import make_optimizer, make_scheduler, skip_update
from nola.training.preflight import RunPlan, plan_run
from nola.training.run_log import LogWindow, RunLog, peak_memory_mb
from nola.training.stop_signals import Preempted, StopSignals


# torch's GradScaler starts at 2**16 and halves on each overflow: 40 overflows in a row take it to 2**-24, the
# smallest fp16 magnitude, and a gradient that overflows even then will not fit at any scale. Past that the scaler is
# no longer calibrating: the run is diverging, and skipping for ever would burn the allocation doing nothing.
MAX_SCALER_OVERFLOWS_IN_A_ROW = 40


class StopRequested(Exception):
    """A stop signal that every rank agreed on during eval, MMLU or sample generation (between two batches)."""


@dataclass
class LoopState:
    """What the loop has done: the counters a checkpoint records and a resume restores."""

    step: int = 0
    tokens_seen: int = 0
    first_eval_loss: float | None = None
    eval_loss: float | None = None
    nonfinite_steps: int = 0  # skipped steps, all of them
    nonfinite_in_a_row: int = 0  # skipped steps since the last update: too many and the run stops
    overflows_in_a_row: int = 0  # fp16 loss-scaler overflows since the last update (MAX_SCALER_OVERFLOWS_IN_A_ROW)
    # Measured once, at a fresh start, before the first step: a resume reports these, not its own checkpoint's.
    samples_before: list[dict[str, str]] = field(default_factory=list)
    answers_before: dict = field(default_factory=dict)

    @classmethod
    def restored(cls, trainer_state: dict) -> LoopState:
        """From a checkpoint's trainer_state.json (older ones lack the skip counters, the first eval and what was
        measured before training)."""
        return cls(step=trainer_state["step"], tokens_seen=trainer_state["tokens_seen"],
                   first_eval_loss=trainer_state.get("first_eval_loss"), eval_loss=trainer_state["eval_loss"],
                   nonfinite_steps=trainer_state.get("nonfinite_steps", 0),
                   nonfinite_in_a_row=trainer_state.get("nonfinite_in_a_row", 0),
                   overflows_in_a_row=trainer_state.get("overflows_in_a_row", 0),
                   samples_before=trainer_state.get("samples_before", []),
                   answers_before=trainer_state.get("answers_before", {}))

    def count_update(self, skipped: bool, scaler_overflow: bool) -> None:
        """Count one optimizer step, updated or skipped. An fp16 gradient overflow with a finite loss
        (`scaler_overflow`) is the loss scaler calibrating, not a divergence: counted apart from the non-finite
        losses, with its own, longer limit."""
        self.step += 1
        if not skipped:
            self.nonfinite_in_a_row = self.overflows_in_a_row = 0
            return
        self.nonfinite_steps += 1
        if scaler_overflow:
            self.overflows_in_a_row += 1
        else:
            self.nonfinite_in_a_row += 1


@dataclass
class StepResult:
    """One optimizer step's micro-batches after their backward passes, before the update."""

    loss_sum: torch.Tensor  # float64: this rank's summed token loss
    label_tokens: int  # response tokens of the global batch: the loss's denominator
    tokens: int  # attended tokens of the global batch: throughput
    stopping: bool  # a rank has a stop request: the step was abandoned
    nonfinite: bool  # a rank's loss is not finite: the step was abandoned


def due_actions(step: int, train: TrainSection) -> tuple[str, ...]:
    """Which periodic actions fire after optimizer step `step`: each of log / eval / save every logging_steps /
    eval_steps / save_steps, and all three after the last step."""
    every = {"log": train.logging_steps, "eval": train.eval_steps, "save": train.save_steps}
    return tuple(name for name, period in every.items() if step % period == 0 or step == train.max_steps)


class FineTuneRecipe:
    """One training run of a recipe, on every rank. `run()` goes through the phases; they can also be called one by
    one (tests do). A SIGTERM / SIGUSR1 during any phase checkpoints the last completed step and raises `Preempted`."""

    def __init__(self, config: RecipeConfig, accelerator=None) -> None:
        self.config = config
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config)
        self.is_main = self.accelerator.is_main_process
        self.output_dir = Path(config.train.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.state = LoopState()
        self.sharded = False  # FSDP2: the base sharded as it loads (nola.training.fsdp), the adapter replicated
        self.plan: RunPlan | None = None
        self.log: RunLog | None = None
        self.stop: StopSignals | None = None
        self.progress_bar = None
        self.window: LogWindow | None = None
        # Set by _build_model: the engine-wrapped model and the model itself, the trained parameters, the optimizer,
        # its schedule and fp16 loss scaler, what was attached, and how the engine runs.
        self.model: torch.nn.Module | None = None
        self.unwrapped: torch.nn.Module | None = None
        self.parameters: list[torch.nn.Parameter] = []
        self.optimizer = None
        self.scheduler = None
        self.scaler = None  # fp16 loss scaling (CUDA, without DeepSpeed)
        self.report: dict[str, float] = {}  # parameter counts (and the SVD start's figures) for the run summary
        self.use_deepspeed = False
        self.deferred = False  # coefficient gradients projected after the last micro-batch (use_deferred_projection)

    def run(self) -> dict:
        """setup, train, finish; returns the run summary (also written to output_dir/run.json on rank 0)."""
        try:
            self.setup()
            self.train()
            return self.finish()
        except StopRequested:
            directory = self.checkpoint() if self.state.step else None
            self.log.close()
            raise Preempted(self.stop.received or "a signal on another rank", self.state.step, directory) from None
        finally:  # also on the way out of an error: the progress bar must not print after it
            self.release()

    # --- setup -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Plan, model, optimizer, scheduler, restore, run log, stop signals, first eval and 'before' samples."""
        self.plan = plan_run(self.config, self.accelerator)
        self._build_model()
        self._restore()
        self.log = RunLog(self.output_dir, self.config.log, self.config.to_dict(), enabled=self.is_main,
                          resumed_step=self.state.step or None)
        self.log.summary(self.report)
        self._print_run_facts()
        self.stop = StopSignals()
        if self.state.step == 0:  # a resume keeps what its fresh start measured (LoopState)
            self.state.first_eval_loss = self.state.eval_loss = self.evaluate()
            at_start = self.mmlu() if self.plan.mmlu_examples and self.config.mmlu.at_start else {}
            self.log.log(0, {"eval_loss": self.state.first_eval_loss, **at_start})
            self.state.samples_before, self.state.answers_before = self.samples(), self.answers()

    def _build_model(self) -> None:
        """The base with the adapter attached, its optimizer and schedule, wrapped by the engine."""
        config, mixed_precision = self.config, self.config.train.mixed_precision
        self.sharded = fsdp_launch()
        if self.sharded:
            model = load_sharded_model(self.plan.model_section, self.accelerator, mixed_precision)
        else:
            model = load_model(self.plan.model_section, self.accelerator.device, mixed_precision)
        svd_report = self._attach_adapter(model)
        record_mixed_precision(model, mixed_precision)
        record_prompt_template(model, self.plan.template)
        self.report = {**parameter_report(model), **svd_report}
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.parameters, config)
        self.scheduler = make_scheduler(optimizer, config)
        if deepspeed_launch() or self.sharded:  # accelerate autocasts plain and DDP runs itself; see make_accelerator
            autocast_forward(model, mixed_precision, self.accelerator.device.type)
        if self.sharded:  # FSDP2 already holds the base; the adapter is replicated, its gradients averaged here
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.use_deepspeed = self.accelerator.distributed_type == "DEEPSPEED"
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        check_trainable_dtypes(self.unwrapped)
        self.deferred = use_deferred_projection(config, self.unwrapped, self.use_deepspeed, self.is_main)
        self.scaler = getattr(self.accelerator, "scaler", None)

    def _attach_adapter(self, model: torch.nn.Module) -> dict[str, float]:
        """Attach the recipe's adapter. An SVD start (`adapter.init: svd`) replaces each base weight by its residual:
        its time and how far it moves the model at step 0 (float rounding on a float base; the re-quantisation of
        the residual on a 4-bit one) are printed and returned for the run summary. On resume the residual is
        rebuilt from the checkpoint's adapter file, not from a second SVD."""
        adapter = self.config.adapter_config()
        if method_for(adapter.method).base_weight_start(adapter) is None:
            attach(model, adapter)
            return {}
        held_out = bool(self.plan.data.validation)
        examples = (self.plan.data.validation or self.plan.data.train)[: self.config.train.micro_batch_size]
        batch = {k: v.to(self.accelerator.device) for k, v in
                 collate(examples, self.plan.tokenizer.pad_token_id).items()}
        base_logits, base_loss = self._probe(model, batch)
        resumed = self.plan.resume_dir is not None
        started = time.perf_counter()
        attach(model, adapter, residuals=residual_factors(self.plan.resume_adapter) if resumed else None)
        seconds = time.perf_counter() - started
        logits, loss = self._probe(model, batch)
        report = {"svd_init_seconds": round(seconds, 3),
                  "svd_step0_max_logit_change": float((logits - base_logits).abs().max()),
                  "svd_step0_loss_change": loss - base_loss}
        if self.is_main:
            kind = "held-out" if held_out else "training"
            print(f"nola: SVD start of {len(list(adapted_modules(model)))} modules in {seconds:.1f} s"
                  f"{' (residual from the checkpoint)' if resumed else ''}; step 0 against the base on "
                  f"{len(examples)} {kind} records: max |logit change| {report['svd_step0_max_logit_change']:.3g}, "
                  f"loss {base_loss:.4f} -> {loss:.4f}")
        return report

    @torch.no_grad()
    def _probe(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Logits and mean token loss of one batch, in eval mode and the run's autocast (as the loop computes)."""
        training = model.training
        model.eval()
        with autocast(self.config.train.mixed_precision, self.accelerator.device.type):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        model.train(training)
        loss_sum, tokens = logits_loss_sum(logits, batch["labels"])
        return logits, loss_sum.item() / max(tokens, 1)

    def _restore(self) -> None:
        """Parameters, optimizer, schedule, loss scale, counters and data position from the resume checkpoint."""
        if self.plan.resume_dir is None:
            return
        saved = load_checkpoint(self.plan.resume_dir, self.unwrapped, self.optimizer, self.scheduler,
                                self.use_deepspeed)
        self.state = LoopState.restored(saved)
        if self.scaler is not None and saved.get("grad_scaler"):
            self.scaler.load_state_dict(saved["grad_scaler"])
        self.plan.stream.seek(saved["epoch"], saved["step_in_epoch"])

    def _print_run_facts(self) -> None:
        if not self.is_main:
            return
        data, accelerator = self.plan.data, self.accelerator
        print(json.dumps({"parameters": self.report, "train_examples": len(data.train),
                          "validation_examples": len(data.validation), "dropped_records": data.dropped,
                          "resumed_from": str(self.plan.resume_dir) if self.plan.resume_dir else None,
                          "distributed_type": "FSDP2" if self.sharded else str(accelerator.distributed_type),
                          "processes": accelerator.num_processes, "device": str(accelerator.device),
                          "deferred_projection": self.deferred,
                          "mixed_precision": self.config.train.mixed_precision,
                          "data_format": self.config.data.format, "template": self.plan.template,
                          "packed_length": self.plan.stream.packed_length}))

    # --- train -----------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps up to train.max_steps."""
        from tqdm.auto import tqdm

        max_steps = self.config.train.max_steps
        self.progress_bar = tqdm(total=max_steps, initial=self.state.step, disable=not self.is_main, desc="train",
                                 unit="step")
        self.model.train()
        self.window = LogWindow(self.state.step)
        stream = self.plan.stream
        while self.state.step < max_steps:
            position, rng = (stream.epoch, stream.index), capture_rng()  # the state a stop mid-step goes back to
            result = self.accumulate(stream.next())
            if result.stopping:
                self.stop_mid_step(position, rng)
            grad_norm, skipped = self.update(result)
            self.count(result, skipped)
            self.periodic(grad_norm)
            hold_if_armed("hold-after", self.state.step, lambda: self.stop.received is not None)
        self.progress_bar.close()

    def accumulate(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Forward and backward of one step's micro-batches on this rank, each loss scaled so that the step's
        gradient is that of the mean loss over the global batch's response tokens. Abandoned, with no further
        backward, as soon as any rank has a stop request or a non-finite loss."""
        device, step = self.accelerator.device, self.state.step + 1
        micro_batches = [{k: v.to(device) for k, v in batch.items()} for batch in micro_batches]
        label_tokens, tokens = global_token_counts(self.accelerator, micro_batches)
        scale = gradient_scale(self.accelerator, self.config.train.grad_accum_steps, self.use_deepspeed)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        stopping = nonfinite = False
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with accumulation_context(self.accelerator, self.model, self.use_deepspeed, self.deferred, last):
                batch_loss, _ = token_loss_sum(self.model, batch)
                if armed("nan-loss", step):
                    batch_loss = batch_loss * float("nan")
                stopping, nonfinite = agreed_flags(self.accelerator, self.stop.received is not None,
                                                   not bool(torch.isfinite(batch_loss)))
                if stopping or nonfinite:
                    break
                self.accelerator.backward(batch_loss * (scale / label_tokens))
            kill_if_armed("micro-batch", step)
            loss_sum += batch_loss.detach().double()
        if self.deferred and not (stopping or nonfinite):
            project_deferred_gradients(self.unwrapped)
        elif self.deferred:
            discard_deferred_gradients(self.unwrapped)
        if (self.deferred or self.sharded) and not (stopping or nonfinite):
            average_gradients(self.accelerator, self.parameters)
        return StepResult(loss_sum, label_tokens, tokens, stopping, nonfinite)

    def stop_mid_step(self, position: tuple[int, int], rng: dict) -> None:
        """The parameters are still those of the last completed step: checkpoint them, with the data position and
        RNG from before the abandoned step (a resume redoes it), and leave."""
        self.optimizer.zero_grad(set_to_none=True)
        directory = self.checkpoint(position, rng)
        self.log.close()
        raise Preempted(self.stop.received or "a signal on another rank", self.state.step, directory)

    def update(self, result: StepResult) -> tuple[float, bool]:
        """Clip and step; or skip a step whose loss or gradient is not finite, leaving the parameters as they were.
        Returns the gradient norm and whether the step was skipped."""
        grad_norm = (float("nan") if result.nonfinite
                     else float(self.accelerator.clip_grad_norm_(self.parameters, self.config.train.max_grad_norm)))
        skipped = result.nonfinite or not math.isfinite(grad_norm)
        if skipped and self.use_deepspeed:
            # DeepSpeed steps inside backward and counts micro-batches itself: a step cannot be skipped, only stopped.
            raise NolaError(f"train: non-finite loss or gradient at step {self.state.step + 1} under DeepSpeed, "
                            f"which cannot skip a step; the last good state is the newest checkpoint in "
                            f"{self.checkpoints_dir}")
        if skipped:
            skip_update(self.optimizer, self.scaler, unscaled=not result.nonfinite)
        else:
            self.optimizer.step()
        self.state.count_update(skipped, scaler_overflow=self.scaler is not None and not result.nonfinite)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def count(self, result: StepResult, skipped: bool) -> None:
        """Tokens, progress and the step's loss; a skipped step is logged, and too many in a row stop the run with
        a checkpoint of the last good state."""
        step, train = self.state.step, self.config.train
        self.state.tokens_seen += result.tokens
        self.progress_bar.update(1)
        if not skipped:
            loss = self.accelerator.reduce(result.loss_sum, reduction="sum").item() / result.label_tokens
            self.window.add(result.tokens, loss, result.label_tokens)
            self.progress_bar.set_postfix(loss=f"{loss:.4f}")
            return
        self.window.add(result.tokens)
        self.log.log(step, {"nonfinite_step": 1, "nonfinite_steps": self.state.nonfinite_steps})
        if self.state.nonfinite_in_a_row >= train.max_nonfinite_steps:
            raise NolaError(f"train: {self.state.nonfinite_in_a_row} steps in a row (to step {step}) had a "
                            f"non-finite loss or gradient and were skipped; stopped with the last good state in "
                            f"{self.checkpoint()}: lower train.lr or check the data "
                            f"(train.max_nonfinite_steps={train.max_nonfinite_steps})")
        if self.state.overflows_in_a_row >= MAX_SCALER_OVERFLOWS_IN_A_ROW:
            raise NolaError(f"train: {self.state.overflows_in_a_row} steps in a row (to step {step}) overflowed in "
                            f"fp16 and were skipped, the loss scale now {self.scaler.get_scale():.3g}; stopped with "
                            f"the last good state in {self.checkpoint()}: use train.mixed_precision=bf16 or lower "
                            f"train.lr")

    def periodic(self, grad_norm: float) -> None:
        """The log line, eval and checkpoint that are due after this step (`due_actions`)."""
        step = self.state.step
        due = due_actions(step, self.config.train)
        if "log" in due:
            rates = self.window.rates(step)
            self.log.log(step, {"loss": rates["loss"], "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                "tokens_per_s": rates["tokens_per_s"], "seconds_per_step": rates["seconds_per_step"],
                                "peak_memory_mb": peak_memory_mb(self.accelerator.device)})
            self.window = LogWindow(step)
        with self.window.paused():  # eval and checkpoint time is not training throughput
            if "eval" in due:
                self.state.eval_loss = self.evaluate()
                self.log.log(step, {"eval_loss": self.state.eval_loss})
            if "save" in due:
                self.checkpoint()

    # --- checkpoint ------------------------------------------------------------------------------------------

    def checkpoint(self, position: tuple[int, int] | None = None, rng: dict | None = None) -> Path:
        """checkpoints/step-N of `self.state` on rank 0, from the training state gathered on all (a collective:
        every rank calls it). The data position and RNG default to now; a stop mid-step passes those from before
        the abandoned step."""
        stream = self.plan.stream
        position = position if position is not None else (stream.epoch, stream.index)
        rng = rng if rng is not None else capture_rng()
        directory = self.checkpoints_dir / f"step-{self.state.step}"
        training_state = gather_training_state(self.unwrapped, self.optimizer, self.use_deepspeed)
        if self.is_main:
            trainer_state = {**dataclasses.asdict(self.state), "epoch": position[0], "step_in_epoch": position[1],
                             "data": data_fingerprint(stream, self.config.split_seed(), self.config.data.format,
                                                      self.plan.template, self.config.data.sequence_length()),
                             "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
            write_checkpoint(directory, self.unwrapped, training_state, self.scheduler, trainer_state, rng)
            rotate_checkpoints(self.checkpoints_dir, self.config.train.save_total_limit)
        self.accelerator.wait_for_everyone()
        return directory

    # --- finish ----------------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """MMLU, answers and samples after training (a stop request still interrupts them), then the final adapter,
        the printed comparison with before training, and run.json; returns the run summary."""
        state = self.state
        summary = {"steps": state.step, "first_eval_loss": state.first_eval_loss, "final_eval_loss": state.eval_loss,
                   "tokens_seen": state.tokens_seen, "nonfinite_steps": state.nonfinite_steps, **self.report}
        if self.plan.mmlu_examples:
            scores = self.mmlu()
            summary.update(scores)
            self.log.log(state.step, scores)
        samples_after, answers_after = self.samples(), self.answers()
        if answers_after:
            summary.update(answers_after)
            summary["answer_accuracy_before"] = state.answers_before.get("answer_accuracy")
        self.release()  # what is left is writing: a signal now takes its default action again
        final_values = gather_training_state(self.unwrapped, self.optimizer, self.use_deepspeed).values  # collective
        if self.is_main:
            save_adapter(self.unwrapped, self.output_dir / "adapter", values=final_values)
            self._print_before_and_after(samples_after, answers_after)
            (self.output_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.log.summary(summary)
        self.log.close()
        self.accelerator.wait_for_everyone()
        return summary

    def _print_before_and_after(self, samples_after: list[dict[str, str]], answers_after: dict) -> None:
        samples_before, answers_before = self.state.samples_before, self.state.answers_before
        if samples_after:
            print_samples("before training", samples_before)
            print_samples("after training", samples_after)
        if answers_after:
            if answers_before:
                print(f"before training: {format_answer_accuracy(answers_before)}")
            print(f"after training:  {format_answer_accuracy(answers_after)}")

    def release(self) -> None:
        """Close the progress bar and give the signals their previous handlers back (idempotent)."""
        if self.progress_bar is not None:
            self.progress_bar.close()
        if self.stop is not None:
            self.stop.restore()

    # --- evaluations, on every rank (under ZeRO-3 a forward is a collective) ------------------------------------

    def interrupt(self) -> None:
        """Called between the batches of eval, MMLU, answer accuracy and sampling: a stop request is honoured there too, within
        seconds, not after the whole evaluation (a scheduler's grace period is short)."""
        if armed("signal-in-eval", self.state.step):
            os.kill(os.getpid(), signal.SIGTERM)
        if agreed_flags(self.accelerator, self.stop.received is not None)[0]:
            raise StopRequested

    def evaluate(self) -> float:
        """Mean token loss on the held-out records (NaN without any)."""
        validation, train = self.plan.data.validation, self.config.train
        if not validation:
            return float("nan")
        return evaluate(self.model, validation, train.micro_batch_size, self.plan.tokenizer.pad_token_id,
                        self.accelerator, train.eval_max_batches, self.interrupt)

    def mmlu(self) -> dict:
        mmlu = self.config.mmlu
        return mmlu_accuracy(self.model, self.plan.tokenizer, self.plan.mmlu_examples, mmlu.batch_size,
                             mmlu.max_length, self.accelerator, self.interrupt)

    def answers(self) -> dict:
        """Exact-match accuracy of greedy answers on held-out records (per task family on the embedded set): what
        a user sees the adapter do, beside the eval loss."""
        train, validation = self.config.train, self.plan.data.validation
        if not (train.answer_accuracy and validation):
            return {}
        embedded_data = self.config.data.path.startswith(embedded.PREFIX)
        return answer_accuracy(self.unwrapped, self.plan.tokenizer, validation[: train.answer_accuracy], None,
                               train.max_new_tokens, family_of=embedded.task_family if embedded_data else None,
                               answers_of=embedded.correct_answers if embedded_data else None,
                               interrupt=self.interrupt)

    def samples(self) -> list[dict[str, str]]:
        train, validation = self.config.train, self.plan.data.validation
        if not (train.sample_generations and validation):
            return []
        return sample_generations(self.unwrapped, self.plan.tokenizer, validation, train.sample_generations,
                                  train.max_new_tokens, self.interrupt)
