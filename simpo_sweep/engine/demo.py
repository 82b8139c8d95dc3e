"""The built-in demo: a tokenizer, a tiny causal LM and a preference task, all built locally.

Nothing here touches the network, so a sweep runs end to end on a laptop with no hub access
and no GPU, and still has a real signal: the task is learnable by the tiny model within
seconds of CPU training at a good learning rate, and not at a learning rate 100x lower.

The task, `builtin:rule-following`, is counting with a rule stated in the prompt. The chosen
response follows the rule; the rejected one breaks it in one of two ways:

    prompt    count down by 3 from 40 to 28
    chosen    40 37 34 31 28
    rejected  40 37 31 34 28      order: two neighbouring numbers swapped
    rejected  40 43 46 49 52      direction: the right step from the right start, the wrong way

Length-normalised log-probs do not separate them by length (same length, and a swap keeps the
same tokens), and neither kind is caught by one surface cue: a swap breaks the progression
anywhere in the answer, and a count in the wrong direction is a perfect progression that only
the prompt's "up"/"down" rules out. So the model has to learn both the progression and to read
the rule from the prompt. Every prompt is a distinct rule instance (direction, step, start,
length), and the hold-out is by prompt, so eval measures generalisation to unseen instances.
Calibration (one CPU thread, tiny-llama, batch 16, 150 steps with 10% warmup then cosine,
sigmoid beta 2, gamma_beta_ratio 0.5, seeds 0-2; 150 steps take 5-10 s): held-out accuracy
starts near 0.5; at learning rates 6e-4 to 2e-3 it passes 0.9 by step 75 and ends at 0.97-1.0;
3e-4 ends near 0.92, 1e-4 near 0.55, 1e-5 near 0.5; from 3e-3 training turns unstable
(0.65-1.0 depending on the seed, about 0.8 at 5e-3). At 1e-3 every SimPO knob setting tried
(beta 1-10, gamma_beta_ratio 0-1, hinge, label_smoothing up to 0.5, sft_weight 0.1) ends
>= 0.99; sft_weight 1.0 slows learning (0.6-0.67 at 3e-4).

`builtin:tiny-llama-sft` starts SimPO where it starts in practice, from an SFT model
(build_sft_demo_model): there reward accuracy is high from the start and generation quality
is what tells trials apart (search_spaces/generation-demo.yaml).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine.batching import IGNORE_INDEX

BUILTIN_PREFIX = "builtin:"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ("system", "user", "assistant")}

# Numbers 0..DEMO_MAX_NUMBER are single tokens; the counting task stays inside this range.
DEMO_MAX_NUMBER = 59
DEMO_WORDS = ("count", "up", "down", "by", "from", "to")
DEMO_STEPS = (1, 2, 3)
DEMO_LENGTHS = range(4, 8)

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
    # > 0: not a random init but the SFT stage SimPO starts from (see build_sft_demo_model).
    sft_steps: int = 0


_TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2}
# Sized so that the counting task is learned in about 100 steps of a few hundredths of a second
# each on one CPU core (calibration in the module docstring); add entries for more models.
BUILTIN_MODELS: dict[str, DemoModelShape] = {
    "tiny-llama": DemoModelShape(**_TINY, num_attention_heads=4),
    "tiny-llama-sft": DemoModelShape(**_TINY, num_attention_heads=4, sft_steps=1500),
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
    transformers choose (sdpa where available). An SFT entry (`tiny-llama-sft`) is one fixed
    model, like a published SFT checkpoint: `seed` does not apply to it.
    """
    shape = BUILTIN_MODELS.get(strip_builtin_prefix(name))
    if shape is not None and shape.sft_steps:
        return build_sft_demo_model(name, tokenizer, attn_implementation=attn_implementation)
    return _random_init(name, tokenizer, seed=seed, attn_implementation=attn_implementation)


def _random_init(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    config = demo_model_config(name, tokenizer)
    # Seed a forked RNG so that building a model does not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation
        )
    model.name_or_path = BUILTIN_PREFIX + strip_builtin_prefix(name)
    return model


# Bump when the SFT stage's recipe changes, so models built by the old one are not reused.
SFT_RECIPE_VERSION = 1
SFT_DATA_SEED = 1234


def demo_model_cache() -> Path:
    """Where built SFT demo models (and converted built-in real models, engine/pretrained.py)
    are kept: $SIMPO_SWEEP_CACHE or ~/.cache/simpo-sweep, under builtin-models/."""
    root = os.environ.get("SIMPO_SWEEP_CACHE") or Path.home() / ".cache" / "simpo-sweep"
    return Path(root) / "builtin-models"


def build_sft_demo_model(
    name: str, tokenizer: PreTrainedTokenizerBase, *, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The demo's stand-in for the SFT checkpoint that SimPO starts from in practice.

    The seed-0 random init after `sft_steps` steps of next-token training on the counting
    task's answers, the rule-breaking ones as well as the right ones (each row's chosen and
    rejected, 4000 rows drawn with their own seed): it writes counts in the task's format,
    not always the one the prompt asks for (0.77 of held-out prompts, greedy; it has seen
    each instance's right count more often than any one broken count, so its held-out reward
    accuracy is already 0.96). From there the preference loss alone
    can raise reward accuracy to 1.0 while the model unlearns to count, and an SFT term keeps
    it counting: the gap that generation evaluation exists to show.

    Built once (about 20 s on one CPU thread) into demo_model_cache() through a temporary
    folder and a rename, so trials starting at once never load a half-written model; later
    loads read it back like a hub model.
    """
    key = strip_builtin_prefix(name)
    shape = BUILTIN_MODELS[key]
    demo_tokenizer = build_demo_tokenizer()
    if tokenizer.get_vocab() != demo_tokenizer.get_vocab():
        raise ValueError(f"{name} was trained with the demo tokenizer: leave model.tokenizer unset")
    folder = demo_model_cache() / f"{key}-v{SFT_RECIPE_VERSION}"
    if not (folder / "config.json").is_file():
        model = _random_init(name, demo_tokenizer, seed=0)
        _supervised_fine_tune(model, demo_tokenizer, steps=shape.sft_steps)
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-")
        try:
            model.save_pretrained(temporary)
            os.rename(temporary, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            # else another process's build landed first: the same model
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    loaded: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation
    )
    loaded.name_or_path = BUILTIN_PREFIX + key
    return loaded


def _supervised_fine_tune(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, steps: int
) -> None:
    """Next-token loss on the response tokens, AdamW at 3e-3, 32 answers a step; one CPU
    thread and fixed seeds, so every machine of one kind builds the same weights."""
    examples: list[tuple[list[int], list[int]]] = []
    for row in _counting_rows(4000, seed=SFT_DATA_SEED):
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt_text = str(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
        prompt_ids = tokenizer.encode(prompt_text)
        for answer in (row["chosen"], row["rejected"]):
            examples.append((prompt_ids, [*tokenizer.encode(answer), tokenizer.eos_token_id]))
    order = random.Random(SFT_DATA_SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SFT_DATA_SEED)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            model.train()
            for _ in range(steps):
                batch = order.sample(examples, 32)
                width = max(len(prompt_ids) + len(answer_ids) for prompt_ids, answer_ids in batch)
                input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
                labels = torch.full((len(batch), width), IGNORE_INDEX)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for index, (prompt_ids, answer_ids) in enumerate(batch):
                    sequence = torch.tensor(prompt_ids + answer_ids)
                    input_ids[index, : len(sequence)] = sequence
                    attention_mask[index, : len(sequence)] = 1
                    labels[index, len(prompt_ids) : len(sequence)] = sequence[len(prompt_ids) :]
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


# ---- preference data ---------------------------------------------------------------------------


def _counting_rows(num_pairs: int, seed: int) -> list[dict[str, str]]:
    """Counting pairs; see the module docstring. Prompts are unique while they last.

    Every rule instance (direction, step, start, length) is a distinct prompt. When more pairs
    are asked for than there are instances, instances repeat with a freshly drawn rejection,
    so a prompt-level hold-out still never shows an eval prompt in training.
    """
    instances = [
        (direction, step, start, length)
        for direction in (1, -1)
        for step in DEMO_STEPS
        for length in DEMO_LENGTHS
        for start in range(DEMO_MAX_NUMBER + 1)
        if _in_range(start + direction * step * (length - 1))
    ]
    rng = random.Random(seed)
    rng.shuffle(instances)
    rows: list[dict[str, str]] = []
    while len(rows) < num_pairs:
        for direction, step, start, length in instances[: num_pairs - len(rows)]:
            numbers = [start + direction * step * index for index in range(length)]
            rows.append(
                {
                    "prompt": f"count {'up' if direction > 0 else 'down'} by {step} "
                    f"from {start} to {numbers[-1]}",
                    "chosen": " ".join(map(str, numbers)),
                    "rejected": " ".join(map(str, _break_rule(numbers, step, direction, rng))),
                }
            )
    return rows


def _in_range(number: int) -> bool:
    return 0 <= number <= DEMO_MAX_NUMBER


def _break_rule(numbers: list[int], step: int, direction: int, rng: random.Random) -> list[int]:
    """A rejected answer: the count in the wrong direction (when it stays in range, half the
    time), else the right count with two neighbouring numbers swapped."""
    start, length = numbers[0], len(numbers)
    if rng.random() < 0.5 and _in_range(start - direction * step * (length - 1)):
        return [start - direction * step * index for index in range(length)]
    broken = list(numbers)
    position = rng.randrange(length - 1)
    broken[position], broken[position + 1] = broken[position + 1], broken[position]
    return broken


# The prompt _counting_rows writes; the rule it states is all a verifier needs.
COUNTING_PROMPT = re.compile(r"count (up|down) by (\d+) from (\d+) to (\d+)")


def rule_answer(prompt: str) -> list[int] | None:
    """The numbers a counting prompt asks for; None when the text is not a counting prompt.

    Surrounding whitespace is ignored (decoded prompts keep the template's spaces).
    """
    match = COUNTING_PROMPT.fullmatch(prompt.strip())
    if match is None:
        return None
    direction, step, start, end = match.groups()
    signed = int(step) if direction == "up" else -int(step)
    if signed == 0 or (int(end) - int(start)) * signed < 0 or (int(end) - int(start)) % signed:
        return None  # not a rule instance: the end is not on the count
    return list(range(int(start), int(end) + signed, signed))


def follows_rule(prompt: str, answer: str) -> bool | None:
    """Whether `answer` is exactly the count `prompt` asks for (numbers separated by
    whitespace, nothing else); None when `prompt` states no counting rule."""
    expected = rule_answer(prompt)
    if expected is None:
        return None
    words = answer.split()
    return all(word.isdigit() for word in words) and [int(word) for word in words] == expected


BUILTIN_DATASETS: dict[str, Callable[[int, int], list[dict[str, str]]]] = {
    "rule-following": _counting_rows,
}

# Bump when a generator's output changes, so cached tokenisations of the old rows are not reused.
BUILTIN_DATASETS_VERSION = 2
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
