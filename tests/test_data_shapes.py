"""Real preference data shapes (hh-rlhf strings, ShareGPT, UltraFeedback-style multi-turn rows
with a prompt column, system messages) through a real tokenizer and a real-sized vocabulary.

The tokenizer is a byte-level BPE trained here with the `tokenizers` library to a 32064-token
vocabulary (Phi-3's size) and a ChatML chat template (Qwen's layout), saved with
save_pretrained and loaded by path through the engine's load_tokenizer; the model is a
randomly initialised Llama over that vocabulary, saved and loaded by path the same way. So
the data takes the path a hub model's would, and the model starts where real random inits
do: near -log(32064) = -10.38 per token.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine.data import (
    SHAPE_HH,
    SHAPE_MESSAGES,
    SHAPE_SHAREGPT,
    DataError,
    PreparedData,
    load_prepared,
    prepare_data,
)
from simpo_sweep.engine.metrics import LogpsStart, diagnose
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer, StepEvent
from simpo_sweep.spec.models import DataSpec, DiagnosticsSpec, ModelSpec, SimPOSpec, TrainingSpec

Row = dict[str, Any]
VOCAB_SIZE = 32064
END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _train_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained to VOCAB_SIZE tokens on made-up words (any text encodes)."""
    rng = random.Random(0)
    syllables = [consonant + vowel for consonant in "bcdfghjklmnprstvwz" for vowel in "aeiou"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(3)) for _ in range(40_000)})
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        [" ".join(words[start : start + 50]) for start in range(0, len(words), 50)], trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END, pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer and a random-init model saved like a hub snapshot."""
    folder = tmp_path_factory.mktemp("chatml-model")
    tokenizer = _train_bpe()
    assert len(tokenizer) == VOCAB_SIZE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec(name=str(model_dir))


@pytest.fixture(scope="module")
def tokenizer(model_spec: ModelSpec) -> PreTrainedTokenizerBase:
    return load_tokenizer(model_spec)


def _write_jsonl(rows: Sequence[Row], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _prepare(model: ModelSpec, tmp_path: Path, rows: Sequence[Row], **data: Any) -> PreparedData:
    source = _write_jsonl(rows, tmp_path / f"data-{len(list(tmp_path.iterdir()))}.jsonl")
    spec = DataSpec(source=str(source), **{"max_length": 256, "max_prompt_length": 192, **data})
    return prepare_data(model, spec, tmp_path / "cache")


def _chatml(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}{END}\n" for m in messages)


def _prompt_text(messages: Sequence[dict[str, str]]) -> str:
    return _chatml(messages) + "<|im_start|>assistant\n"


def _pairs(prepared: PreparedData, tokenizer: PreTrainedTokenizerBase) -> set[tuple[str, ...]]:
    """Every kept pair of both splits as decoded (prompt, chosen, rejected)."""
    decoded = set()
    for split in (prepared.train, prepared.eval):
        for index in range(len(split)):
            decoded.add(
                tuple(
                    tokenizer.decode(column[index])
                    for column in (split.prompt_ids, split.chosen_ids, split.rejected_ids)
                )
            )
    return decoded


def _assert_no_identical_pair(prepared: PreparedData) -> None:
    for split in (prepared.train, prepared.eval):
        for index in range(len(split)):
            assert split.chosen_ids[index] != split.rejected_ids[index], index


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


# ---- hh-rlhf dialogue strings ------------------------------------------------------------------


def _hh(*turns: str) -> str:
    return "".join(
        f"\n\n{'Human' if position % 2 == 0 else 'Assistant'}: {text}"
        for position, text in enumerate(turns)
    )


def _hh_rows(count: int) -> list[Row]:
    """Single- and multi-turn dialogues that differ only in their last assistant turn."""
    rows = []
    for index in range(count):
        question = f"What is {index} plus {index + 2}?"
        if index % 2:
            history: tuple[str, ...] = (question,)
        else:
            history = ("Hello there.", f"Hi! Ask me anything, number {index}.", question)
        rows.append(
            {
                "chosen": _hh(*history, f"It is {2 * index + 2}."),
                "rejected": _hh(*history, f"It is {2 * index + 3}, I think."),
            }
        )
    return rows


def test_hh_dialogues_split_at_the_last_shared_assistant_turn(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = _hh_rows(12)

    prepared = _prepare(model_spec, tmp_path, rows, eval_fraction=0.25)

    expected = set()
    for index in range(12):
        question = f"What is {index} plus {index + 2}?"
        prompt = (
            [_user(question)]
            if index % 2
            else [
                _user("Hello there."),
                _assistant(f"Hi! Ask me anything, number {index}."),
                _user(question),
            ]
        )
        expected.add(
            (
                _prompt_text(prompt),
                f"It is {2 * index + 2}.{END}",
                f"It is {2 * index + 3}, I think.{END}",
            )
        )
    assert _pairs(prepared, tokenizer) == expected
    assert prepared.summary.shape == SHAPE_HH
    assert prepared.summary.chat_template == "tokenizer's own"


def test_hh_dialogues_without_a_chat_template_keep_their_labels(
    tmp_path: Path, model_dir: Path
) -> None:
    """A base model's tokenizer: the turns are written back as Human/Assistant text."""
    plain = PreTrainedTokenizerFast.from_pretrained(model_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    spec = ModelSpec(name=str(model_dir), tokenizer=str(tmp_path / "plain"))
    rows = _hh_rows(6)

    prepared = _prepare(spec, tmp_path, rows, eval_fraction=0.3)

    decoded = _pairs(prepared, plain)
    assert (
        "\n\nHuman: Hello there.\n\nAssistant: Hi! Ask me anything, number 0.\n\nHuman: "
        "What is 0 plus 2?\n\nAssistant:",
        f" It is 2.{END}",
        f" It is 3, I think.{END}",
    ) in decoded
    assert len(decoded) == 6
    assert prepared.summary.chat_template == "plain"


# ---- ShareGPT / LLaMA-Factory ------------------------------------------------------------------


def _sharegpt_rows(count: int) -> list[Row]:
    rows = []
    for index in range(count):
        turns = [
            {"from": "system", "value": "You answer in one sentence."},
            {"from": "human", "value": f"Name a colour, please ({index})."},
        ]
        if index % 3 == 0:
            turns += [
                {"from": "gpt", "value": "Blue."},
                {"from": "human", "value": f"Another one ({index})."},
            ]
        rows.append(
            {
                "conversations": turns,
                "chosen": {"from": "gpt", "value": f"Green, number {index}."},
                "rejected": {"from": "gpt", "value": "I will not."},
            }
        )
    return rows


def test_sharegpt_rows_keep_the_system_turn_and_every_shared_turn(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    prepared = _prepare(model_spec, tmp_path, _sharegpt_rows(9), eval_fraction=0.3)

    expected = set()
    for index in range(9):
        prompt = [
            _system("You answer in one sentence."),
            _user(f"Name a colour, please ({index})."),
        ]
        if index % 3 == 0:
            prompt += [_assistant("Blue."), _user(f"Another one ({index}).")]
        expected.add((_prompt_text(prompt), f"Green, number {index}.{END}", f"I will not.{END}"))
    assert _pairs(prepared, tokenizer) == expected
    assert prepared.summary.shape == SHAPE_SHAREGPT


def test_sharegpt_user_and_assistant_names_work_too(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [
        {
            "conversations": [{"from": "user", "value": f"Say {index}."}],
            "chosen": {"from": "assistant", "value": f"{index}."},
            "rejected": {"from": "assistant", "value": "No."},
        }
        for index in range(6)
    ]

    prepared = _prepare(model_spec, tmp_path, rows, eval_fraction=0.3)

    assert (_prompt_text([_user("Say 4.")]), f"4.{END}", f"No.{END}") in _pairs(prepared, tokenizer)


# ---- UltraFeedback-style multi-turn rows with a prompt column ----------------------------------


def _ultrafeedback_row(index: int, *, system: bool, chosen: str, rejected: str) -> Row:
    """The prompt column holds only the first user turn; the dialogues share two more turns."""
    first = f"Plan a trip to city {index}."
    history = [
        *([_system("You are a travel agent.")] if system else []),
        _user(first),
        _assistant(f"Day one: museums of city {index}. Day two: the old harbour and markets."),
        _user("Make it cheaper."),
    ]
    return {
        "prompt": first,
        "chosen": [*history, _assistant(chosen)],
        "rejected": [*history, _assistant(rejected)],
    }


def test_multi_turn_rows_take_the_shared_turns_into_the_prompt(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [
        _ultrafeedback_row(
            index, system=index % 2 == 0, chosen=f"Walk, {index} euros.", rejected="Fly first."
        )
        for index in range(10)
    ]

    prepared = _prepare(model_spec, tmp_path, rows, max_length=200, max_prompt_length=140)

    expected = {
        (
            _prompt_text(row["chosen"][:-1]),
            f"{row['chosen'][-1]['content']}{END}",
            f"Fly first.{END}",
        )
        for row in rows
    }
    assert _pairs(prepared, tokenizer) == expected
    assert prepared.summary.shape == SHAPE_MESSAGES
    assert prepared.summary.truncated == 0


def test_multi_turn_rows_stay_distinct_under_tight_truncation(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Taking the prompt column (the first user turn, 29 tokens here) as the whole prompt made
    the shared answer and second user turn (50 tokens) part of both responses, which 45
    tokens of response room then cut down to the same tokens: before the fix, the 5 rows
    without a system message (whose prompt column matched the dialogues' first turn exactly)
    trained as 5 identical pairs. With the shared turns in the prompt, cut from the left,
    every pair keeps its own answer."""
    rows = [
        _ultrafeedback_row(
            index, system=index % 2 == 0, chosen=f"Walk, {index} euros.", rejected="Fly first."
        )
        for index in range(10)
    ]

    prepared = _prepare(model_spec, tmp_path, rows, max_length=74, max_prompt_length=60)

    _assert_no_identical_pair(prepared)
    assert prepared.summary.pairs == 10 and sum(prepared.summary.dropped.values()) == 0
    assert prepared.summary.train.truncated_prompt + prepared.summary.eval.truncated_prompt == 10
    pairs = _pairs(prepared, tokenizer)
    assert {(chosen, rejected) for _, chosen, rejected in pairs} == {
        (f"Walk, {index} euros.{END}", f"Fly first.{END}") for index in range(10)
    }
    last_turn = _prompt_text([_user("Make it cheaper.")])
    assert all(prompt.endswith(last_turn) for prompt, _, _ in pairs)


def test_a_prompt_column_that_disagrees_with_the_dialogues_names_the_row(
    tmp_path: Path, model_spec: ModelSpec
) -> None:
    rows = [
        _ultrafeedback_row(index, system=False, chosen="Walk.", rejected="Fly.")
        for index in range(6)
    ]
    rows[4]["prompt"] = "Plan a trip to the moon."

    with pytest.raises(DataError) as raised:
        _prepare(model_spec, tmp_path, rows)

    assert "row 4: field 'chosen' does not continue the prompt" in str(raised.value)


def test_a_prompt_column_longer_than_the_shared_prompt_is_an_error(
    tmp_path: Path, model_spec: ModelSpec
) -> None:
    """The prompt column holds a first answer that both dialogues repeat, but the dialogues
    part at the next user turn: the column is not a prefix of what they share."""
    row = {
        "prompt": [_user("Hi."), _assistant("Hello.")],
        "chosen": [_user("Hi."), _assistant("Hello."), _user("Count."), _assistant("1 2")],
        "rejected": [_user("Hi."), _assistant("Hello."), _user("Spell."), _assistant("a b")],
    }
    rows = [row, *[{**row, "prompt": [_user("Hi.")]} for _ in range(3)]]

    with pytest.raises(DataError) as raised:
        _prepare(model_spec, tmp_path, rows)

    assert str(raised.value).startswith(
        "row 0: field 'prompt' is not the start of the conversation that 'chosen' and "
        "'rejected' share"
    )


# ---- the summary's counts ----------------------------------------------------------------------


def _nearest_rank(values: Sequence[int], percent: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(percent / 100 * len(ordered)) - 1]


def test_summary_counts_every_kept_dropped_and_truncated_pair(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    long_answer = "Take the night bus, then walk along the river to the station. " * 4
    train = [
        _ultrafeedback_row(index, system=index < 3, chosen=f"Walk {index}.", rejected="Fly.")
        for index in range(8)
    ]
    train += [
        _ultrafeedback_row(8, system=False, chosen="Fly.", rejected="Fly."),  # identical
        _ultrafeedback_row(9, system=False, chosen=" Fly. ", rejected=" Fly. "),  # identical
        _ultrafeedback_row(10, system=False, chosen="Walk.", rejected="  "),  # empty
        # differ only after the response room: identical once truncated
        _ultrafeedback_row(11, system=False, chosen=long_answer + "A", rejected=long_answer + "B"),
        # differs early, cut late: kept, truncated
        _ultrafeedback_row(12, system=False, chosen="Bus. " + long_answer, rejected="Fly."),
    ]
    evaluation = [
        _ultrafeedback_row(20 + index, system=True, chosen=f"Train {index}.", rejected="Car.")
        for index in range(3)
    ] + [_ultrafeedback_row(23, system=True, chosen="Car.", rejected="Car.")]
    train_path = _write_jsonl(train, tmp_path / "train.jsonl")
    eval_path = _write_jsonl(evaluation, tmp_path / "eval.jsonl")
    data = DataSpec(
        source=str(train_path), eval_split=str(eval_path), max_length=200, max_prompt_length=140
    )

    prepared = prepare_data(model_spec, data, tmp_path / "cache")
    summary = prepared.summary

    assert (summary.rows_read, summary.train.rows, summary.eval.rows) == (17, 13, 4)
    assert (summary.train.pairs, summary.eval.pairs) == (9, 3)
    assert summary.train.dropped == {
        "empty_response": 1,
        "identical_responses": 2,
        "empty_after_truncation": 0,
        "identical_after_truncation": 1,
    }
    assert summary.eval.dropped["identical_responses"] == 1
    assert summary.eval.dropped_total == 1
    assert (summary.train.truncated, summary.train.truncated_response) == (1, 1)
    assert (summary.train.truncated_prompt, summary.eval.truncated) == (0, 0)
    assert summary.shapes == {SHAPE_MESSAGES: 17}
    _assert_no_identical_pair(prepared)

    # lengths before truncation, over the 16 pairs that were tokenised (not the empty one)
    tokenised = [row for row in train + evaluation if row["rejected"][-1]["content"].strip()]
    prompt_lengths = [
        len(tokenizer(_prompt_text(row["chosen"][:-1]), add_special_tokens=False)["input_ids"])
        for row in tokenised
    ]
    response_lengths = [
        len(tokenizer(row[side][-1]["content"] + END, add_special_tokens=False)["input_ids"])
        for row in tokenised
        for side in ("chosen", "rejected")
    ]
    assert len(prompt_lengths) == 16
    for percent in (50, 90, 99):
        assert getattr(summary.prompt_tokens, f"p{percent}") == _nearest_rank(
            prompt_lengths, percent
        )
        assert getattr(summary.response_tokens, f"p{percent}") == _nearest_rank(
            response_lengths, percent
        )
    assert summary.prompt_tokens.max == max(prompt_lengths)
    assert summary.response_tokens.max == max(response_lengths)
    assert summary.response_tokens.max > data.max_length - min(prompt_lengths)  # not truncated

    # the old flat counts agree with it
    assert prepared.stats["dropped_identical"] == 4
    assert prepared.stats["dropped_empty"] == 1
    assert prepared.stats["train_pairs"] + prepared.stats["eval_pairs"] == 12
    # and the summary survives the manifest
    assert prepared.path is not None
    assert load_prepared(prepared.path).summary == summary


def test_summary_prints_and_logs_under_flat_data_names(
    tmp_path: Path, model_spec: ModelSpec
) -> None:
    prepared = _prepare(model_spec, tmp_path, _sharegpt_rows(9), eval_fraction=0.3)
    summary = prepared.summary

    text = summary.format()
    assert "shape: sharegpt; chat template: tokenizer's own" in text
    assert f"rows read: 9; pairs kept: {summary.train.pairs} train" in text
    params, metrics = summary.params(), summary.metrics()
    assert params == {"data.shape": "sharegpt", "data.chat_template_used": "tokenizer's own"}
    assert metrics["data.rows_read"] == 9.0
    assert metrics["data.train_pairs"] + metrics["data.eval_pairs"] == 9.0
    assert metrics["data.dropped_identical_responses"] == 0.0
    assert metrics["data.prompt_tokens_max"] == float(summary.prompt_tokens.max)
    assert all(name.startswith("data.") and "/" not in name for name in {*params, *metrics})
    assert all(isinstance(value, float) for value in metrics.values())
    # never one of the spec's own data.* params, which the trial's child run logs already
    spec_fields = {f"data.{name}" for name in DataSpec.model_fields}
    assert not spec_fields & set(params)


# ---- bad rows in these shapes ------------------------------------------------------------------


BAD_ROWS: dict[str, tuple[Row, str]] = {
    "hh response that is not a dialogue": (
        {"chosen": _hh("Hi", "Hello"), "rejected": "Hello"},
        "field 'rejected' is not an hh-rlhf dialogue",
    ),
    "sharegpt speaker unknown": (
        {
            "conversations": [{"from": "bot", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "field 'conversations' message 0 is from 'bot'; ShareGPT turns must be from one of",
    ),
    "sharegpt answer by the human": (
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "human", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "field 'chosen' does not continue the prompt with an assistant message",
    ),
    "sharegpt turn without value": (
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "field 'chosen' message 0 has no 'value'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_of_a_real_shape_is_named(
    tmp_path: Path, model_spec: ModelSpec, case: str
) -> None:
    bad, problem = BAD_ROWS[case]
    good = _hh_rows(4) if "hh" in case else _sharegpt_rows(4)
    rows = [*good[:2], bad, *good[2:]]

    with pytest.raises(DataError) as raised:
        _prepare(model_spec, tmp_path, rows)

    assert f"row 2: {problem}" in str(raised.value)


# ---- a random-init model over a real vocabulary ------------------------------------------------


def test_collapse_is_not_read_at_initialisation(
    tmp_path: Path, model_spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> None:
    """An untrained model over 32k tokens starts below -10 per token: that is where it
    starts, not a collapse. A fall of more than collapse_drop from there is one."""
    prepared = _prepare(model_spec, tmp_path, _hh_rows(16), eval_fraction=0.25)
    model = load_model(model_spec, tokenizer, "cpu")
    assert model.config.vocab_size == VOCAB_SIZE
    events: list[StepEvent] = []
    trainer = SimPOTrainer(
        model,
        prepared.train,
        prepared.eval,
        training=TrainingSpec(
            learning_rate=1e-3, max_steps=4, batch_size=4, warmup_ratio=0.0, eval_every=2
        ),
        simpo=SimPOSpec(),
        pad_token_id=tokenizer.pad_token_id,
        device="cpu",
    )

    result = trainer.fit(events.append)

    first = events[0].train_metrics
    assert first["train/logps/chosen"] < -10 and first["train/logps/rejected"] < -10
    assert first["train/logps/chosen"] == pytest.approx(-math.log(VOCAB_SIZE), abs=0.1)
    assert not result.diagnosis.degenerate and result.stopped_reason is None
    start = LogpsStart.read(first)
    assert start is not None
    rules = DiagnosticsSpec()
    for event in events:
        diagnosis = diagnose(
            event.train_metrics,
            step=event.step,
            max_steps=4,
            rules=rules,
            length_averaged=True,
            start=start,
        )
        assert not diagnosis.degenerate, diagnosis.summary()
    fallen = {
        **events[-1].train_metrics,
        "train/logps/chosen": start.chosen - rules.collapse_drop - 0.5,
        "train/logps/rejected": start.rejected - rules.collapse_drop - 0.5,
    }
    collapsed = diagnose(
        fallen, step=4, max_steps=4, rules=rules, length_averaged=True, start=start
    )
    assert collapsed.verdict == "degenerate"
    assert "collapse" in collapsed.summary() and "lower the learning rate" in collapsed.summary()
