"""Conversations -> token ids with labels on the assistant turns, for the chat templates (`data.template`):

    llama2     LLaMA-2-chat's own format, as Meta's reference code builds it: one `<s>[INST] user [/INST] answer </s>`
               per exchange, the system prompt inside the first user turn between `<<SYS>>` and `<</SYS>>`
    tokenizer  the tokenizer's `chat_template`, through `apply_chat_template`

An encoded conversation is a list of spans (token ids, trained or not, the exchange they belong to): every
assistant turn is trained with the end of its turn (EOS for llama2, the template's end-of-turn marker for
`tokenizer`), the rest is not (all of it with `train_on_source`). Token boundaries between turns are found on the
whole conversation's tokenisation (where the tokenisation of the text up to a turn stops agreeing with it), so no
seam gets a token the whole text would not have.

Too long for `max_seq_len`, a conversation loses whole exchanges from the middle first (the second, then the
third, ...: the first, which carries the system prompt, and the last stay), and only then is cut at the end; one
left without a trained token is dropped (and counted) by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from nola.data.formats import Record
from nola.data.templates import IGNORE_INDEX, common_prefix_length, format_prompt
from nola.errors import NolaError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass
class Span:
    ids: list[int]
    trained: bool
    exchange: int  # 0 for the first user/assistant exchange (with the system prompt and any preamble)


def as_conversation(record: Record) -> list[dict[str, str]]:
    """The turns of a record of any conversational format: messages as they are, an Alpaca record or a
    prompt/completion pair as one user/assistant exchange."""
    if "messages" in record:
        return record["messages"]
    if "instruction" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"].strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def llama2_exchanges(turns: list[dict[str, str]], where: str) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a conversation, the system prompt folded into the first user turn as LLaMA-2-chat
    was trained; its turns must alternate user/assistant and end with the assistant's."""
    system = turns[0]["content"] if turns[0]["role"] == "system" else None
    dialogue = turns[1:] if system is not None else turns
    roles = [turn["role"] for turn in dialogue]
    if not roles or len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise NolaError(f"{where}: data.template llama2 needs turns alternating user, assistant and ending with the "
                        f"assistant's (got {', '.join(roles) or 'no turn'} after the system prompt)")
    pairs = [(dialogue[i]["content"].strip(), dialogue[i + 1]["content"].strip()) for i in range(0, len(dialogue), 2)]
    if system is not None:
        pairs[0] = (f"{B_SYS}{system.strip()}{E_SYS}{pairs[0][0]}", pairs[0][1])
    return pairs


def encode_llama2(tokenizer, turns: list[dict[str, str]], where: str) -> list[Span]:
    """Spans of a conversation in LLaMA-2-chat's format: [BOS] [INST] user [/INST] (untrained), answer EOS."""
    if tokenizer.bos_token_id is None:
        raise NolaError("data.template: llama2 needs a tokenizer with a BOS token (LLaMA-2's own)")
    spans = []
    for exchange, (user, answer) in enumerate(llama2_exchanges(turns, where)):
        prompt = _ids(tokenizer, f"{B_INST} {user} {E_INST}")
        whole = _ids(tokenizer, f"{B_INST} {user} {E_INST} {answer} ")
        boundary = common_prefix_length(prompt, whole)
        spans.append(Span([tokenizer.bos_token_id, *whole[:boundary]], False, exchange))
        spans.append(Span([*whole[boundary:], tokenizer.eos_token_id], True, exchange))
    return spans


def _render(tokenizer, turns: list[dict[str, str]], generation_prompt: bool, where: str = "prompt") -> str:
    if not turns and not generation_prompt:
        return ""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as error:  # templates raise on conversations they refuse (alternation, roles)
        raise NolaError(f"{where}: the tokenizer's chat template refuses the conversation ({error})") from None


def encode_chat_template(tokenizer, turns: list[dict[str, str]], where: str) -> list[Span]:
    """Spans of a conversation rendered by the tokenizer's chat template: each turn from where its rendering starts,
    and each assistant turn's answer, from where the generation prompt ends to where the next turn starts, trained
    (with the template's end-of-turn marker)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NolaError("data.template: tokenizer, but the tokenizer has no chat_template (use llama2 or alpaca)")
    whole_text = _render(tokenizer, turns, False, where)
    cuts: list[tuple[int, bool, int]] = []  # (character position, trained from there on, exchange)
    exchange = 0
    for index, turn in enumerate(turns):
        if turn["role"] == "user" and any(t["role"] == "user" for t in turns[:index]):
            exchange += 1
        cuts.append((len(_checked_prefix(tokenizer, turns[:index], False, whole_text, where)), False, exchange))
        if turn["role"] == "assistant":
            cuts.append((len(_checked_prefix(tokenizer, turns[:index], True, whole_text, where)), True, exchange))
    whole = _ids(tokenizer, whole_text)
    starts = [0]  # the template's preamble belongs to the first turn
    for position, _, _ in cuts[1:]:  # never backwards: a merge across a seam must not duplicate tokens
        starts.append(max(starts[-1], common_prefix_length(_ids(tokenizer, whole_text[:position]), whole)))
    ends = starts[1:] + [len(whole)]
    return [Span(whole[start:end], trained, exchange)
            for start, end, (_, trained, exchange) in zip(starts, ends, cuts) if end > start]


def _checked_prefix(tokenizer, turns: list[dict[str, str]], generation_prompt: bool, whole_text: str,
                    where: str) -> str:
    prefix = _render(tokenizer, turns, generation_prompt, where)
    if not whole_text.startswith(prefix):
        raise NolaError(f"{where}: the tokenizer's chat template does not render the conversation's first "
                        f"{len(turns)} turns as the start of the whole one, so its assistant turns cannot be told "
                        f"apart (use data.template llama2)")
    return prefix


def encode_raw(tokenizer, record: Record) -> list[Span]:
    """Spans of a record rendered by no template: a prompt/completion pair as its two texts joined (BOS, the
    prompt untrained, the completion and EOS trained; the boundary found on the joined tokenisation), a text
    record as BOS, its text and EOS, all trained."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if "text" in record:
        return [Span(bos + _ids(tokenizer, record["text"]) + [tokenizer.eos_token_id], True, 0)]
    prompt = _ids(tokenizer, record["prompt"])
    whole = _ids(tokenizer, record["prompt"] + record["completion"])
    boundary = common_prefix_length(prompt, whole)
    return [Span(bos + whole[:boundary], False, 0), Span(whole[boundary:] + [tokenizer.eos_token_id], True, 0)]


ENCODERS = {"llama2": lambda tokenizer, record, where: encode_llama2(tokenizer, as_conversation(record), where),
            "tokenizer": lambda tokenizer, record, where: encode_chat_template(tokenizer, as_conversation(record),
                                                                                where),
            "none": lambda tokenizer, record, where: encode_raw(tokenizer, record)}


def conversation_example(tokenizer, record: Record, template: str, max_seq_len: int, train_on_source: bool,
                         where: str) -> dict[str, list[int]] | None:
    """One training example of a record under a chat template (or none): ids, labels (IGNORE_INDEX where not
    trained), `prompt_length`, the tokens before the first trained one (what sample generations prompt with), and
    `reference_end`, where that first answer ends (a conversation's later turns are no part of its reference).
    None when the record has no answer to learn (every assistant turn, completion or text empty, as an Alpaca
    record with an empty output is dropped) or no trained token fits in `max_seq_len`."""
    spans = fit(ENCODERS[template](tokenizer, record, where), max_seq_len, train_on_source)  # refuses what it can't
    if not has_answer(record) or not any(span.trained and span.ids for span in spans):
        return None
    ids = [token for span in spans for token in span.ids]
    labels = [token if span.trained or train_on_source else IGNORE_INDEX for span in spans for token in span.ids]
    first = next(index for index, span in enumerate(spans) if span.trained and span.ids)
    prompt_length = sum(len(span.ids) for span in spans[:first])
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length,
            "reference_end": prompt_length + len(spans[first].ids)}


def has_answer(record: Record) -> bool:
    """Whether a record holds something to learn: a non-empty assistant turn, completion or text."""
    if "text" in record:
        return bool(record["text"].strip())
    return any(turn["role"] == "assistant" and turn["content"].strip() for turn in as_conversation(record))


def generation_prompt(tokenizer, template: str, instruction: str, context: str = "") -> str | list[int]:
    """What generation is prompted with for one instruction (and optional input), as an adapter trained with
    `template` saw prompts: the Alpaca prompt as text, or a chat template's token ids up to the answer."""
    record = {"instruction": instruction, "input": context, "output": ""}
    if template == "alpaca":
        return format_prompt(record)
    user = as_conversation(record)[:1]
    if template == "llama2":
        return [tokenizer.bos_token_id, *_ids(tokenizer, f"{B_INST} {user[0]['content'].strip()} {E_INST}")]
    if template == "tokenizer":
        return _ids(tokenizer, _render(tokenizer, user, True))
    return user[0]["content"]


def fit(spans: list[Span], max_seq_len: int, train_on_source: bool = False) -> list[Span]:
    """The spans within `max_seq_len` tokens: whole exchanges dropped from the middle (earliest first), then the
    end cut, then the untrained spans left at the end dropped (unless train_on_source trains them)."""
    exchanges = sorted({span.exchange for span in spans})
    middle = exchanges[1:-1]
    while sum(len(s.ids) for s in spans) > max_seq_len and middle:
        dropped = middle.pop(0)
        spans = [s for s in spans if s.exchange != dropped]
    kept, room = [], max_seq_len
    for span in spans:
        if room <= 0:
            break
        kept.append(Span(span.ids[:room], span.trained, span.exchange))
        room -= len(kept[-1].ids)
    while not train_on_source and kept and not kept[-1].trained and any(s.trained for s in kept):
        kept.pop()  # a prompt cut off before its answer teaches nothing: no dead tail in a row
    return kept
