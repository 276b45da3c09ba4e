"""Using a trained adapter: load base + adapter as training computed them, generate, compare logits.

The base is loaded the way the adapter was trained on it, and run the way training ran it: the adapter records
whether bitsandbytes quantised the base and how, the dtype its other weights were held in, and the autocast of the
run. So an evaluation measures the model that was trained, and an export check compares the export with that model,
not with a float32 re-computation of it: on an nf4 base with bf16 autocast the two differ by about as much as a
short fine-tune moves the logits, which would make such a check meaningless.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nola import embedded
from nola.adapter_io import AdapterFile, apply_adapter, read_adapter
from nola.data import Example, format_prompt
from nola.errors import NolaError
from nola.modeling import ModelSection, autocast_forward, check_model_source, load_model, load_tokenizer

# Fixed instructions for the logit checks of merge_and_export: a spread of lengths, with and without an input.
CHECK_RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": ""},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps on the warm stone."},
    {"instruction": "What is the capital of the country?", "input": "France"},
]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_section(base: str, adapter: AdapterFile | None) -> ModelSection:
    """The model section that loads `base` as the adapter was trained on it. Without an adapter (a merged export)
    the checkpoint's own dtype is kept, as plain transformers would load it."""
    base = check_model_source(embedded.resolve(base))
    if adapter is None:
        return ModelSection(name_or_path=base, torch_dtype="auto")
    recorded = adapter.base
    dtype = recorded.get("embedding", {}).get("dtype", "float32")
    quantization = recorded.get("quantization")
    if quantization is None:
        return ModelSection(name_or_path=base, torch_dtype=dtype)
    return ModelSection(name_or_path=base, load_in_4bit=True, quant_type=quantization["quant_type"],
                        double_quant=quantization["double_quant"], compute_dtype=quantization["dtype"])


def trained_mixed_precision(adapter: AdapterFile | None) -> str:
    """The autocast the adapter was trained under ("no" for adapters that predate the record, and for none)."""
    return adapter.base.get("mixed_precision", "no") if adapter is not None else "no"


def trained_prompt_template(adapter: AdapterFile | None) -> str:
    """The prompt template the adapter was trained with ("alpaca" for adapters that predate the record)."""
    return adapter.base.get("prompt_template", "alpaca") if adapter is not None else "alpaca"


def load_for_inference(base: str, adapter_dir: str | Path | None = None, device: torch.device | None = None):
    """(model, tokenizer): `base` (a checkpoint, a merged export, or `embedded:tiny-llama`) with the adapter at
    `adapter_dir` applied, if any, computing as it was trained (4-bit layers, dtypes, autocast)."""
    adapter = read_adapter(adapter_dir) if adapter_dir is not None else None
    section = base_section(base, adapter)
    mixed_precision = trained_mixed_precision(adapter)
    tokenizer = load_tokenizer(section, None)
    model = load_model(section, device or default_device(), mixed_precision)
    if adapter is not None:
        apply_adapter(model, adapter)
    model.config.use_cache = True
    return autocast_forward(model.eval(), mixed_precision), tokenizer


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The Stanford Alpaca prompt training used, for one instruction (and optional input)."""
    return format_prompt({"instruction": instruction, "input": context, "output": ""})


@torch.no_grad()
def prompt_logits(model: nn.Module, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """float32 logits of every position of each prompt, one prompt at a time (no padding to disagree about)."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        outputs.append(model(input_ids=ids).logits[0].float().cpu())
    return outputs


def max_logit_difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(reference, candidate, strict=True))


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str | list[int]], max_new_tokens: int, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
    """Completions of `prompts` (texts, tokenised with the tokenizer's BOS, or token ids as a chat template makes
    them; left-padded batches); temperature 0 is greedy, otherwise sampling from a seeded generator state so a run
    can be repeated."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    sampling = temperature > 0
    options = dict(do_sample=sampling, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    completions = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in prompts[start : start + batch_size]]
            batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            output = model.generate(**batch, **options)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


@torch.no_grad()
def greedy_responses(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16, interrupt: Callable[[], None] | None = None) -> list[tuple[str, bool]]:
    """(text, finished) for each prompt (token ids): greedy decoding in left-padded batches of similar lengths,
    cut at the first EOS; `finished` is whether EOS came within `max_new_tokens`. The one greedy decoder of
    training's answer accuracy and samples. `interrupt` runs before each batch (it raises to stop early); the model
    goes back to the train/eval mode it was in, however this ends."""
    if batch_size < 1 or max_new_tokens < 1:
        raise NolaError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[str, bool] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            if interrupt is not None:
                interrupt()
            chosen = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chosen)
            input_ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
            for row, index in enumerate(chosen):
                ids = prompts[index]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
            )
            for row, index in enumerate(chosen):
                new = output[row, width:].tolist()
                finished = eos in new
                new = new[:new.index(eos)] if finished else new
                results[index] = (tokenizer.decode(new, skip_special_tokens=True), finished)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def sample_generations(model: nn.Module, tokenizer, examples: list[Example], count: int, max_new_tokens: int,
                       interrupt: Callable[[], None] | None = None) -> list[dict[str, str]]:
    """Greedy completions of the first `count` tokenized examples' prompts, beside their reference responses: what
    a run prints before and after training. Examples with no prompt (plain text records) have nothing to prompt
    with and are passed over; a conversation's reference is its first answer (`reference_end`). One prompt a batch:
    no padding, so a sample reads as the model answers that prompt alone. `interrupt` runs before each prompt."""
    chosen = [e for e in examples if e["prompt_length"] > 0][:count]
    prompts = [list(e["input_ids"][:e["prompt_length"]]) for e in chosen]
    generated = greedy_responses(model, tokenizer, prompts, max_new_tokens, batch_size=1, interrupt=interrupt)
    return [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True)[-120:],
             "reference": tokenizer.decode(example["input_ids"][example["prompt_length"]:example.get("reference_end")],
                                           skip_special_tokens=True),
             "generated": text}
            for example, prompt, (text, _) in zip(chosen, prompts, generated)]


def print_samples(title: str, samples: list[dict[str, str]]) -> None:
    print(f"--- generations {title} ---")
    for sample in samples:
        print(f"... {sample['prompt']!r}\n    reference: {sample['reference']!r}\n"
              f"    generated: {sample['generated']!r}")
