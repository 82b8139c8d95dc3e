"""The built-in demo: a tokenizer, a tiny causal LM and a preference task, all built locally.

Nothing here touches the network, so a sweep runs end to end on a laptop with no hub access
and no GPU, and still has a real signal: the task is learnable by the tiny model within a
minute of CPU training at a good learning rate, and not at a learning rate 100x lower.

The task, `builtin:rule-following`, is counting with a rule stated in the prompt:

    prompt    count down by 3 from 40 to 28
    chosen    40 37 34 31 28
    rejected  40 37 31 34 28      (two neighbouring numbers swapped)

The rejected response has the same length and the same multiset of tokens as the chosen one,
so neither length nor any single token separates them: the model has to learn the order the
rule implies (which number follows which, given direction and step). Every prompt is unique,
so a hold-out of prompts is a test of generalisation to rule instances never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ("system", "user", "assistant")}

# Numbers 0..DEMO_MAX_NUMBER are single tokens; the counting task stays inside this range.
DEMO_MAX_NUMBER = 59
DEMO_WORDS = ("count", "up", "down", "by", "from", "to")

# Each message is "<|role|> content"; an assistant turn ends with EOS so that the response
# tokens (conversation minus generation prompt) end with EOS like a real instruct template.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('demo chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def strip_builtin_prefix(name: str) -> str:
    return name.removeprefix(BUILTIN_PREFIX)


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


# ---- tokenizer ---------------------------------------------------------------------------------


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo task's words and numbers, with a chat template.

    Words are split on whitespace only, so decode(encode(text)) gives the text back for any
    single-spaced text over the vocabulary; anything else maps to <unk>.
    """
    special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values()]
    words = [*DEMO_WORDS, *(str(number) for number in range(DEMO_MAX_NUMBER + 1))]
    vocab = {token: index for index, token in enumerate([*special_tokens, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registered as special so that "<|user|>" or "7</s>" split around them before the
    # whitespace split, whatever spacing the template produces.
    backend.add_special_tokens(special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        # The chat template adds BOS itself; encode() of plain text adds nothing.
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        model_max_length=1024,
    )
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    tokenizer.name_or_path = "builtin:demo-tokenizer"
    return tokenizer


# ---- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 256


# Sized to learn the counting task in about a minute on 2 CPU cores (see the calibration notes
# in the project docs); add entries here to offer more built-in models.
BUILTIN_MODELS: dict[str, DemoModelShape] = {
    "tiny-llama": DemoModelShape(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    ),
}


def demo_model_config(name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    key = strip_builtin_prefix(name)
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; known: {known}")
    shape = BUILTIN_MODELS[key]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_demo_model(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A randomly initialised Llama from the registry; the same seed gives the same weights.

    Any tokenizer works: the embedding table is sized from it. `attn_implementation` None lets
    transformers choose (sdpa where available).
    """
    config = demo_model_config(name, tokenizer)
    # Seed a forked RNG so that building a model does not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation
        )
    model.name_or_path = BUILTIN_PREFIX + strip_builtin_prefix(name)
    return model


# ---- preference data ---------------------------------------------------------------------------


def _counting_rows(num_pairs: int, seed: int) -> list[dict[str, str]]:
    """Counting pairs; see the module docstring. Prompts are unique while they last.

    Every rule instance (direction, step, start, length) is a distinct prompt. When more pairs
    are asked for than there are instances, instances repeat with a different swap position,
    so a prompt-level hold-out still never shows an eval prompt in training.
    """
    instances = [
        (direction, step, start, length)
        for direction in ("up", "down")
        for step in (1, 2, 3)
        for length in range(4, 8)
        for start in range(DEMO_MAX_NUMBER + 1)
        if 0 <= start + (step if direction == "up" else -step) * (length - 1) <= DEMO_MAX_NUMBER
    ]
    rng = random.Random(seed)
    rng.shuffle(instances)
    rows: list[dict[str, str]] = []
    while len(rows) < num_pairs:
        for direction, step, start, length in instances[: num_pairs - len(rows)]:
            signed_step = step if direction == "up" else -step
            numbers = [start + signed_step * index for index in range(length)]
            end = numbers[-1]
            swapped = list(numbers)
            position = rng.randrange(length - 1)
            swapped[position], swapped[position + 1] = swapped[position + 1], swapped[position]
            rows.append(
                {
                    "prompt": f"count {direction} by {step} from {start} to {end}",
                    "chosen": " ".join(map(str, numbers)),
                    "rejected": " ".join(map(str, swapped)),
                }
            )
    return rows


BUILTIN_DATASETS: dict[str, Callable[[int, int], list[dict[str, str]]]] = {
    "rule-following": _counting_rows,
}

# Bump when a generator's output changes, so cached tokenisations of the old rows are not reused.
BUILTIN_DATASETS_VERSION = 1
# Pairs generated for a built-in source when the spec does not bound them.
DEFAULT_DEMO_PAIRS = 2000


def demo_preference_rows(name: str, num_pairs: int, seed: int) -> list[dict[str, str]]:
    """`num_pairs` rows of prompt/chosen/rejected strings of the built-in data set `name`."""
    key = strip_builtin_prefix(name)
    if key not in BUILTIN_DATASETS:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in sorted(BUILTIN_DATASETS))
        raise ValueError(f"unknown built-in data set {name!r}; known: {known}")
    if num_pairs <= 0:
        raise ValueError(f"num_pairs must be > 0, got {num_pairs}")
    return BUILTIN_DATASETS[key](num_pairs, seed)
