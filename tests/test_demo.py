"""The built-in demo (issue 2): tokenizer, tiny model and preference task, all built locally,
and the property the quickstart sweep depends on: a good learning rate learns the task on
held-out prompts within minutes on CPU, a learning rate 100x lower does not.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from simpo_sweep.engine import demo
from simpo_sweep.engine.data import prepare_data
from simpo_sweep.engine.generation import GenerationEvaluator, select_prompts
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.scorers import RuleScorer
from simpo_sweep.engine.train import SimPOTrainer
from simpo_sweep.spec.models import DataSpec, EvaluationSpec, ModelSpec, SimPOSpec, TrainingSpec

PROMPT = re.compile(r"count (up|down) by (\d+) from (\d+) to (\d+)")


def _rule(prompt: str) -> list[int]:
    """The answer a prompt asks for."""
    match = PROMPT.fullmatch(prompt)
    assert match is not None, prompt
    direction, step, start, end = match.groups()
    signed = int(step) if direction == "up" else -int(step)
    return list(range(int(start), int(end) + signed, signed))


def _numbers(text: str) -> list[int]:
    return [int(token) for token in text.split()]


# ---- tokenizer and model -----------------------------------------------------------------------


def test_tokenizer_round_trips_demo_text() -> None:
    tokenizer = demo.build_demo_tokenizer()
    text = "count down by 3 from 40 to 28"

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert len(ids) == 8 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_marks_turns_and_ends_answers_with_eos() -> None:
    tokenizer = demo.build_demo_tokenizer()
    messages = [{"role": "user", "content": "count up by 1 from 1 to 3"}]

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    dialogue = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "1 2 3"}], tokenize=False
    )

    assert prompt == "<s><|user|> count up by 1 from 1 to 3 <|assistant|> "
    assert dialogue == "<s><|user|> count up by 1 from 1 to 3 <|assistant|> 1 2 3</s> "
    assert dialogue.startswith(prompt)


def test_demo_model_is_seeded_and_sized_from_the_tokenizer() -> None:
    tokenizer = demo.build_demo_tokenizer()

    first = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    again = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    other = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=1)

    assert first.get_input_embeddings().weight.shape[0] == len(tokenizer)
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_building_a_model_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo.build_demo_model("builtin:tiny-llama", demo.build_demo_tokenizer(), seed=7)

    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: builtin:tiny-llama"):
        demo.build_demo_model("builtin:huge-llama", demo.build_demo_tokenizer())
    with pytest.raises(ValueError, match="known: builtin:rule-following"):
        demo.demo_preference_rows("builtin:trivia", 10, seed=0)


# ---- the preference task -----------------------------------------------------------------------


def test_chosen_follows_the_prompts_rule_and_rejected_breaks_it() -> None:
    rows = demo.demo_preference_rows("builtin:rule-following", 2000, seed=0)
    kinds = {"order": 0, "direction": 0}

    for row in rows:
        expected = _rule(row["prompt"])
        chosen, rejected = _numbers(row["chosen"]), _numbers(row["rejected"])
        assert chosen == expected
        assert rejected != expected and len(rejected) == len(expected)
        if sorted(rejected) == sorted(expected):
            kinds["order"] += 1
        else:
            # the right step from the right start, counted the other way
            assert rejected[0] == expected[0]
            assert rejected[1] - rejected[0] == expected[0] - expected[1]
            kinds["direction"] += 1

    assert min(kinds.values()) > 0.3 * len(rows), kinds


def test_rows_are_seeded_and_prompts_unique_while_instances_last() -> None:
    rows = demo.demo_preference_rows("builtin:rule-following", 500, seed=0)

    assert rows == demo.demo_preference_rows("builtin:rule-following", 500, seed=0)
    assert rows != demo.demo_preference_rows("builtin:rule-following", 500, seed=1)
    assert len({row["prompt"] for row in rows}) == 500


# ---- learning ----------------------------------------------------------------------------------

# Calibrated on 2 CPU cores (see engine/demo.py): held-out accuracy >= 0.97 from step 75 at
# 1e-3 over seeds 0-2, about 0.5 at 1e-5. Each run takes 5-10 s of training on one thread.
GOOD_LEARNING_RATE = 1e-3
DEMO_TRAINING = {"max_steps": 150, "batch_size": 16, "eval_every": 150, "warmup_ratio": 0.1}


def _held_out_accuracy(tmp_path: Path, learning_rate: float) -> tuple[float, float]:
    """(held-out reward accuracy after training, seconds it took from data to result)."""
    started = time.perf_counter()
    model_spec = ModelSpec()
    prepared = prepare_data(
        model_spec,
        DataSpec(max_length=64, max_prompt_length=24),
        tmp_path / "cache",
    )
    tokenizer = load_tokenizer(model_spec)
    trainer = SimPOTrainer(
        load_model(model_spec, tokenizer, "cpu"),
        prepared.train,
        prepared.eval,
        training=TrainingSpec(learning_rate=learning_rate, **DEMO_TRAINING),
        simpo=SimPOSpec(),
        pad_token_id=tokenizer.pad_token_id,
        device="cpu",
    )
    before = trainer.evaluate()["eval/rewards/accuracies"]
    assert 0.35 < before < 0.65, "the untrained model must not already know the task"
    result = trainer.fit()
    return result.metrics["eval/rewards/accuracies"], time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_good_learning_rate_learns_the_task_and_100x_lower_does_not(tmp_path: Path) -> None:
    good, seconds = _held_out_accuracy(tmp_path, GOOD_LEARNING_RATE)
    low, _ = _held_out_accuracy(tmp_path, GOOD_LEARNING_RATE / 100)

    assert good >= 0.9
    assert seconds < 180
    assert low <= 0.65


# ---- from the SFT model: reward accuracy ranks nothing, generations do -------------------------


@pytest.fixture(scope="module")
def sft_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """builtin:tiny-llama-sft built here, in a cache of the test's own."""
    cache = tmp_path_factory.mktemp("sft-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMPO_SWEEP_CACHE", str(cache))
        yield cache


def _sft_trial(cache: Path, learning_rate: float, sft_weight: float) -> tuple[float, float, float]:
    """(rule score of greedy generations before, after; held-out reward accuracy after)
    for 150 steps of SimPO from the SFT demo model, on 32 held-out prompts."""
    model_spec = ModelSpec(name="builtin:tiny-llama-sft")
    prepared = prepare_data(
        model_spec, DataSpec(max_length=64, max_prompt_length=24), cache / "data"
    )
    tokenizer = load_tokenizer(model_spec)
    settings = EvaluationSpec(
        enabled=True, num_prompts=32, max_new_tokens=10, scorer="builtin:rule"
    )
    evaluator = GenerationEvaluator(
        select_prompts(
            prepared.eval.prompt_ids, prepared.eval.chosen_ids, tokenizer, num_prompts=32, seed=0
        ),
        settings,
        tokenizer,
        RuleScorer(),
        every=150,
        device="cpu",
    )
    model = load_model(model_spec, tokenizer, "cpu")
    before = evaluator.evaluate(model, 0).metrics["eval/generation/score"]
    trainer = SimPOTrainer(
        model,
        prepared.train,
        prepared.eval,
        training=TrainingSpec(learning_rate=learning_rate, **DEMO_TRAINING),
        simpo=SimPOSpec(sft_weight=sft_weight),
        pad_token_id=tokenizer.pad_token_id,
        device="cpu",
    )
    accuracy = trainer.fit().metrics["eval/rewards/accuracies"]
    after = evaluator.evaluate(model, 150).metrics["eval/generation/score"]
    return before, after, accuracy


def test_the_sft_demo_model_is_built_once_and_read_back_the_same(
    sft_model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = demo.build_demo_tokenizer()
    built = demo.build_demo_model("builtin:tiny-llama-sft", tokenizer)
    (folder,) = (sft_model_folder / "builtin-models").iterdir()

    def train_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SFT stage ran again instead of reading the cache")

    monkeypatch.setattr(demo, "_supervised_fine_tune", train_again)
    again = demo.build_demo_model("builtin:tiny-llama-sft", tokenizer, seed=5)

    assert (folder / "config.json").is_file()
    for name, weight in built.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name
    untrained = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    assert not torch.equal(built.lm_head.weight, untrained.lm_head.weight)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_from_the_sft_model_reward_accuracy_ranks_nothing_and_generations_do(
    sft_model_folder: Path,
) -> None:
    """What search_spaces/generation-demo.yaml relies on (measured: the SFT model writes the
    right count for 0.77 of the prompts; after 150 steps, no SFT term at 2e-3: accuracy 1.0,
    rule score ~0.1; sft_weight 1 at 1e-3: accuracy 1.0, rule score ~0.97)."""
    start, collapsed, collapsed_accuracy = _sft_trial(sft_model_folder, 2e-3, sft_weight=0.0)
    _, held, held_accuracy = _sft_trial(sft_model_folder, 1e-3, sft_weight=1.0)

    assert 0.4 <= start <= 0.95, "the SFT model counts, but not always right"
    assert collapsed_accuracy >= 0.97 and held_accuracy >= 0.97
    assert collapsed <= start - 0.3, "the preference loss alone unlearns counting"
    assert held >= max(start, 0.85), "an SFT term keeps it counting and SimPO improves it"
