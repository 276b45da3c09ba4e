"""The embedded default: a tiny LLaMA, its tokenizer and an instruction set, built locally on first use.

The README's one command must train something real on a fresh machine with no download. So nola carries a small
synthetic world (capitals, opposites, animal classes, colours, animals of a class, word order) and builds from it:

  * `embedded:tiny-instructions`: ~3,000 Alpaca-format records (JSON list) asking about that world;
  * `embedded:tiny-llama`: a 4-layer LLaMA (hidden 128, 2 KV heads, ~1M weights) with a 1,000-piece SentencePiece
    tokenizer (BPE, byte fallback, LLaMA's special ids), pre-trained (about 2 minutes on 2 idle cores) on plain prose
    about the same world, never on the instruction format.

So the base "knows" the facts but not how to answer an instruction: that is what the adapter learns, as in the
paper's Alpaca runs. Everything is seeded (local generators, never the global RNG state of the caller) and cached
under $NOLA_CACHE_DIR (default ~/.cache/nola)/embedded-v3; the build goes to a temporary directory renamed into
place under a file lock, so concurrent processes (ranks, parallel runs) build it once and never see half of it.

The build is meant to be byte-identical on every x86-64 machine with the same torch build, whatever the caller's
thread count or CPU: it runs in a child process whose kernels are pinned (`PINNED_KERNELS`; checked on one CPU
under every kernel set and thread count, the rest rests on ATen's portable kernels and MKL's documented
reproducibility). Seeds alone are not enough: hundreds of chaotic optimizer steps turn the last-bit differences between
CPUs' vector kernels (ATen's AVX-512 and AVX2 paths sum in other orders; MKL picks its GEMM code per CPU) into a
different model, and so into other `make train` figures (embedded-v1 was built with the caller's kernels).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import torch

from nola.data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from nola.errors import NolaError

VERSION = "embedded-v3"  # bump whenever the built bytes change: a stale cache is never used
PREFIX = "embedded:"
ASSETS = {"tiny-llama": "tiny-llama", "tiny-instructions": "tiny-instructions.json"}
# 400 steps at a peak lr of 6e-3 (embedded-v2: 800 at 3e-3, 4.5 minutes) keep a newcomer's first `make train`
# under 5 minutes. Tried on the build's pinned kernels, scored by what `make train` then teaches (of 60 answers):
# 800 steps at 3e-3 21 (eval loss 1.45), 400 at 3e-3 4, 400 at 6e-3 14 (1.51), 400 at 1e-2 5, and 700 rows of 8
# at 3e-3 or 6e-3 9 and 10 in the same time.
PRETRAIN_STEPS = 400
PRETRAIN_LR = 6e-3
PRETRAIN_BATCH = 16  # rows of 128 tokens per step
PROGRESS_EVERY = 50  # pre-training steps between two progress lines: a first run shows it is moving
PROGRESS = "nola: embedded default: "  # the child's lines that the parent passes on

# The environment of the build's child process (read by torch and MKL at start-up, so a running process cannot pin
# them). Measured on one AVX-512 CPU: each of ATen's kernel sets (avx512, avx2, default) gives other gradients from
# the first step. MKL's default (AUTO) branch is chosen per CPU, and its AVX2 branch is reproducible on Intel CPUs
# only; COMPATIBLE is the one branch Intel documents as reproducible on non-Intel CPUs too, and only at a fixed
# thread count (measured: 2 threads give other weights than 1). Two threads, not one: every partition of a
# reduction is then fixed whatever the machine's core count (a one-core machine runs both threads on its core).
# Cost, measured on 2 idle cores: a 40-step build took 17.0 s pinned at 2 threads, 23.4 s pinned at 1 and 8.6 s
# unpinned (MKL's COMPATIBLE GEMMs and ATen's unvectorised kernels); the whole pinned build 131 s (embedded-v3),
# once per cache.
PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's portable kernels: the same code on every x86-64 CPU
    "MKL_CBWR": "COMPATIBLE",          # MKL's reproducible branch (SSE2, no approximate rcp/rsqrt)
    "OMP_NUM_THREADS": "2",            # a fixed count: no partition of any reduction depends on the machine
    "MKL_NUM_THREADS": "2",
    "MKL_DYNAMIC": "FALSE",            # MKL may not drop threads on a busy or smaller machine
    # For the runs on these kernels (`make train`): inductor's C++ for ATen's default kernels does not compile
    # (torch 2.13 emits vector reductions with no vector ISA), so nola's basis kernels would warn and fall back to
    # eager anyway; eager gives the same values bit for bit (nola/fused.py).
    "NOLA_BASIS_BACKEND": "eager",
}

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "Poland": "Warsaw", "Cuba": "Havana", "India": "New Delhi", "China": "Beijing", "Russia": "Moscow",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Turkey": "Ankara",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad", "old": "new",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low", "strong": "weak",
    "rich": "poor", "wet": "dry", "loud": "quiet", "long": "short", "thick": "thin", "near": "far", "clean": "dirty",
}
ANIMALS = {
    "dog": "mammal", "cat": "mammal", "horse": "mammal", "whale": "mammal", "mouse": "mammal", "bat": "mammal",
    "eagle": "bird", "owl": "bird", "penguin": "bird", "duck": "bird", "crow": "bird", "parrot": "bird",
    "shark": "fish", "salmon": "fish", "trout": "fish", "tuna": "fish", "cod": "fish", "carp": "fish",
    "snake": "reptile", "lizard": "reptile", "turtle": "reptile", "crocodile": "reptile", "gecko": "reptile",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow", "a tomato": "red",
    "an orange": "orange", "a plum": "purple", "the sea": "blue", "a lemon": "yellow", "milk": "white",
    "a leaf": "green", "a cherry": "red", "chocolate": "brown", "a carrot": "orange", "soot": "black",
}
WORDS = ["red", "tree", "river", "stone", "bird", "house", "moon", "song", "bread", "road", "cloud", "fire", "book",
         "door", "hill", "lamp", "ship", "rain", "star", "wind"]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _prose_sentence(rng: random.Random) -> str:
    """One plain-text statement about the world (pre-training corpus); some are questions and answers in plain
    prose, the way web text holds them, so the base can condition an answer on a question."""
    if rng.random() < 0.3:
        record = _instruction(rng)
        question = f"{record['instruction']} {record['input']}".strip()
        return rng.choice([f"Q: {question} A: {record['output']}",
                           f"Asked \"{question}\", one answers: {record['output']}"])
    kind = rng.randrange(5)
    if kind == 0:
        country, city = rng.choice(list(CAPITALS.items()))
        return rng.choice([f"The capital of {country} is {city}.", f"{city} is the capital of {country}.",
                           f"People in {country} call {city} their capital."])
    if kind == 1:
        word, opposite = rng.choice(list(OPPOSITES.items()))
        return rng.choice([f"The opposite of {word} is {opposite}.", f"The opposite of {opposite} is {word}.",
                           f"{_sentence(word)} and {opposite} are opposites."])
    if kind == 2:
        animal, group = rng.choice(list(ANIMALS.items()))
        return rng.choice([f"A {animal} is a {group}.", f"The {animal} is a kind of {group}.",
                           f"Every {animal} is a {group}."])
    if kind == 3:
        thing, colour = rng.choice(list(COLOURS.items()))
        return rng.choice([f"{_sentence(thing)} is {colour}.", f"The colour of {thing} is {colour}."])
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Backwards, the words {' '.join(words)} read {' '.join(reversed(words))}."


# The task families of the instruction set, in the order `_family_instruction` draws them (its first draw,
# `rng.randrange(len(FAMILIES))`, is the index: adding or reordering one changes every embedded record), each with
# the instruction it asks: a str.format template whose one field, if any, is the subject. The builder and
# `task_family` both read this table, so the classification cannot drift from how records are made.
FAMILIES: dict[str, str] = {
    "capital": "What is the capital of {}?",
    "opposite": "Give the opposite of the word below.",
    "animal_class": "Is this animal a mammal, a bird, a fish or a reptile?",
    "colour": "What colour is {}?",
    "reverse": "Write these words in reverse order.",
    "name_two": "Name two animals that are {}.",
}
_FAMILY_PATTERNS = [
    (family, re.compile("".join(r"(.+)" if part == "{}" else re.escape(part)
                                for part in re.split(r"(\{\})", template) if part)))
    for family, template in FAMILIES.items()
]


def _family_instruction(rng: random.Random) -> tuple[str, dict[str, str]]:
    """(family, record): one Alpaca-style record whose answer follows from facts the base model read in
    pre-training, with the name of the family it belongs to (not stored in the record: the embedded data, unchanged
    since embedded-v1, must stay byte-identical, so the family is recovered from the instruction by `task_family`)."""
    kind = rng.randrange(len(FAMILIES))
    family = list(FAMILIES)[kind]
    template = FAMILIES[family]
    if kind == 0:
        country, city = rng.choice(list(CAPITALS.items()))
        return family, {"instruction": template.format(country), "input": "",
                        "output": f"The capital of {country} is {city}."}
    if kind == 1:
        word, opposite = rng.choice(list(OPPOSITES.items()) + [(b, a) for a, b in OPPOSITES.items()])
        return family, {"instruction": template, "input": word, "output": f"The opposite of {word} is {opposite}."}
    if kind == 2:
        animal, group = rng.choice(list(ANIMALS.items()))
        return family, {"instruction": template, "input": animal, "output": f"A {animal} is a {group}."}
    if kind == 3:
        thing, colour = rng.choice(list(COLOURS.items()))
        return family, {"instruction": template.format(thing), "input": "",
                        "output": f"{_sentence(thing)} is {colour}."}
    if kind == 4:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return family, {"instruction": template, "input": " ".join(words), "output": " ".join(reversed(words))}
    group = rng.choice(sorted(set(ANIMALS.values())))
    members = sorted(animal for animal, kind_of in ANIMALS.items() if kind_of == group)
    picked = rng.sample(members, 2)
    plural = group if group == "fish" else group + "s"
    return family, {"instruction": template.format(plural), "input": "",
                    "output": f"A {picked[0]} and a {picked[1]} are both {plural}."}


def _instruction(rng: random.Random) -> dict[str, str]:
    """One Alpaca-style record whose answer follows from facts the base model read in pre-training."""
    return _family_instruction(rng)[1]


def task_family(record_or_instruction: dict[str, str] | str) -> str:
    """The family (a key of `FAMILIES`) of an embedded instruction, given its record or its instruction text;
    "other" for an instruction the embedded set never asks (a user's own data)."""
    instruction = (record_or_instruction.get("instruction", "") if isinstance(record_or_instruction, dict)
                   else record_or_instruction).strip()
    for family, pattern in _FAMILY_PATTERNS:
        if pattern.fullmatch(instruction):
            return family
    return "other"


def correct_answers(record: dict[str, str]) -> list[str]:
    """Every response that answers `record` rightly, in the form the records teach: the record's own `output` and,
    for `name_two`, any two distinct animals of the class in either order (the record holds one random pair; the
    other families have one right answer). For `answer_accuracy(answers_of=...)`: still exact matches, only not
    against one arbitrary pick."""
    answers = [record["output"]] if record.get("output") else []
    if task_family(record) == "name_two":
        plural = _FAMILY_PATTERNS[list(FAMILIES).index("name_two")][1].fullmatch(record["instruction"].strip())[1]
        group = "fish" if plural == "fish" else plural.removesuffix("s")
        members = sorted(animal for animal, kind_of in ANIMALS.items() if kind_of == group)
        answers += [f"A {a} and a {b} are both {plural}." for a in members for b in members if a != b]
    return list(dict.fromkeys(answers))


def instruction_records(count: int = 3000, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(f"tiny-instructions:{seed}")
    return [_instruction(rng) for _ in range(count)]


def prose_corpus(count: int = 24000, seed: int = 0) -> list[str]:
    """Paragraphs of 4-8 statements: the base model's pre-training text."""
    rng = random.Random(f"tiny-prose:{seed}")
    paragraphs = []
    while sum(len(p) for p in paragraphs) < count * 40:
        paragraphs.append(" ".join(_prose_sentence(rng) for _ in range(rng.randint(4, 8))))
    return paragraphs


def _train_tokenizer(texts: list[str], directory: Path, vocab_size: int = 1000) -> None:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, split digits, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece as spm

    model = io.BytesIO()  # not a model_prefix: the trainer would record that path (the build's pid) in the file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **special,
        "pad_token": None, "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 512,
        "padding_side": "right",
    }, indent=2) + "\n")


def _pretrain(directory: Path, paragraphs: list[str], steps: int = PRETRAIN_STEPS) -> None:
    """Next-token pre-training on the prose, packed into 128-token rows; seeded on a forked RNG."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = [token for ids in tokenizer(paragraphs)["input_ids"] for token in ids + [tokenizer.eos_token_id]]
    sequence, batch_size = 128, PRETRAIN_BATCH
    rows = torch.tensor(ids[: len(ids) // sequence * sequence]).view(-1, sequence)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        )
        generator = torch.Generator().manual_seed(0)
        model.train()
        started = time.perf_counter()
        for step in range(steps):
            batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == steps:
                _progress(f"pre-training step {step + 1}/{steps}, loss {loss.item():.3f}, "
                          f"{time.perf_counter() - started:.0f} s")
    model.eval()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a first run's output should be our lines only
    try:
        model.save_pretrained(directory)
    finally:
        transformers_logging.enable_progress_bar()
    (directory / "pretraining.json").write_text(json.dumps(
        {"steps": steps, "batch": [batch_size, sequence], "final_train_loss": round(loss.item(), 4),
         "kernels": _kernels()}, indent=2
    ) + "\n")


def _progress(message: str) -> None:
    print(PROGRESS + message, flush=True)


def _kernels() -> dict:
    """What the pre-training ran on, recorded beside the weights: where a build differs from the published one,
    this says whether the pins held (a CPU without the pinned path, or a torch that ignores them)."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"), "torch": torch.__version__}


def _die_with_parent(parent_pid: int) -> None:
    """In the build's child, first thing: the kernel kills it when its parent dies. A parent killed outright
    (SIGKILL, a test's timeout) runs no cleanup, and an orphaned build would compute on beside the next one. (Set
    here rather than in a preexec_fn, which is unsafe in a parent with threads; a parent already gone is checked.)"""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:
            os._exit(1)


def _build_in_child(target: str, pretrain_steps: str, parent_pid: str) -> None:
    _die_with_parent(int(parent_pid))
    _build_here(target, int(pretrain_steps))


def _build(target: Path, pretrain_steps: int = PRETRAIN_STEPS) -> None:
    """Build every asset into `target` in a child process under `PINNED_KERNELS`, so the bytes do not depend on
    this process's threads or CPU. The child's progress lines are passed on as they come (a first build takes
    minutes); a failure raises NolaError with the child's last output."""
    package_parent = str(Path(__file__).resolve().parents[1])  # the child imports this very nola
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "import sys; from nola.embedded import _build_in_child; "
               "_build_in_child(*sys.argv[1:])", str(target), str(pretrain_steps), str(os.getpid())]
    last_lines: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, env={**os.environ, **PINNED_KERNELS, "PYTHONPATH": path}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as child:
        try:
            for line in child.stdout:
                if line.startswith(PROGRESS):
                    print(line, end="", flush=True)
                last_lines.append(line)
            returncode = child.wait()
        except BaseException:  # interrupted or timed out: the child must not outlive us, computing on
            child.kill()
            raise
    if returncode != 0:
        output = "".join(last_lines).strip()[-3000:]
        raise NolaError(f"building the embedded default failed (exit code {returncode}):\n{output}")


def _build_here(target: str | Path, pretrain_steps: int = PRETRAIN_STEPS) -> None:
    """The build itself, in this process with its kernels as they are (`_build` runs it pinned in a child)."""
    target = Path(target)
    records = instruction_records()
    paragraphs = prose_corpus()
    model_dir = target / ASSETS["tiny-llama"]
    model_dir.mkdir(parents=True)
    templates = [PROMPT_WITH_INPUT.format(**r) if r["input"] else PROMPT_NO_INPUT.format(**r) for r in records[:300]]
    _train_tokenizer(paragraphs + templates + [r["output"] for r in records], model_dir)
    _progress(f"tokenizer trained; pre-training {pretrain_steps} steps on {torch.get_num_threads()} threads")
    _pretrain(model_dir, paragraphs, pretrain_steps)
    (target / ASSETS["tiny-instructions"]).write_text(json.dumps(records, indent=1) + "\n")


def build_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file of a built embedded default, by relative path: what "the same build" means (the tests
    and bench/embedded_spread.py compare these across threads and CPU kernels)."""
    root = Path(root)
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def nola_cache_dir() -> Path:
    """Where nola keeps what it builds or converts once: $NOLA_CACHE_DIR, default ~/.cache/nola."""
    return Path(os.environ.get("NOLA_CACHE_DIR") or Path.home() / ".cache" / "nola")


def cache_root() -> Path:
    return nola_cache_dir() / VERSION


def ensure_built() -> Path:
    """The cache directory holding every embedded asset, building it (once, under a lock) if needed."""
    root = cache_root()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.is_dir():  # another process built it while we waited
            return root
        for stale in root.parent.glob(f"{VERSION}.building-*"):  # a killed build's: only the lock holder builds
            shutil.rmtree(stale, ignore_errors=True)
        staging = root.parent / f"{VERSION}.building-{os.getpid()}"
        print(f"nola: building the embedded default in {root} (once, a few minutes; progress follows)",
              flush=True)
        try:
            _build(staging)
            for built in staging.rglob("*"):  # a deterministic build is never edited: tests link it read-only
                if built.is_file():
                    built.chmod(0o444)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def resolve(value: str) -> str:
    """`embedded:NAME` -> the local path of that asset (built on first use); anything else unchanged."""
    if not value.startswith(PREFIX):
        return value
    name = value[len(PREFIX):]
    if name not in ASSETS:
        raise NolaError(f"unknown embedded asset {value!r} (known: {', '.join(PREFIX + n for n in ASSETS)})")
    return str(ensure_built() / ASSETS[name])
