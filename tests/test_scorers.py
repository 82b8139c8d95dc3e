"""Scorers (engine/scorers.py): the demo task's verifier on right and wrong answers, and a
reward model built locally (a tiny LlamaForSequenceClassification with the demo tokenizer,
saved with save_pretrained and loaded by path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from simpo_sweep.engine import demo
from simpo_sweep.engine.scorers import RewardModelScorer, RuleScorer, build_scorer
from simpo_sweep.spec.models import EvaluationSpec


def test_rule_answers_of_the_demo_prompts() -> None:
    assert demo.rule_answer("count down by 3 from 40 to 28") == [40, 37, 34, 31, 28]
    assert demo.rule_answer(" count up by 1 from 5 to 8 ") == [5, 6, 7, 8]
    assert demo.rule_answer("count up by 2 from 5 to 8") is None  # 8 is not on the count
    assert demo.rule_answer("what is 2 + 2") is None


def test_the_verifier_accepts_the_right_count_only() -> None:
    prompt = "count down by 3 from 40 to 28"
    assert demo.follows_rule(prompt, "40 37 34 31 28") is True
    assert demo.follows_rule(prompt, " 40 37  34 31 28 ") is True  # spacing is not content
    for wrong in (
        "40 37 31 34 28",  # two neighbours swapped: the demo's rejected answers
        "40 43 46 49 52",  # the right step the wrong way
        "40 37 34 31",  # stops early
        "40 37 34 31 28 25",  # runs on
        "40 37 34 31 28 </s>",  # anything that is not a number
        "<|assistant|> <|assistant|>",
        "",
    ):
        assert demo.follows_rule(prompt, wrong) is False, wrong


def test_every_chosen_answer_of_the_demo_data_follows_its_rule_and_no_rejected_one() -> None:
    rows = demo.demo_preference_rows("builtin:rule-following", 300, seed=1)
    scorer = RuleScorer()
    prompts = [row["prompt"] for row in rows]
    assert scorer.score(prompts, [row["chosen"] for row in rows]) == [1.0] * len(rows)
    assert scorer.score(prompts, [row["rejected"] for row in rows]) == [0.0] * len(rows)


def test_the_verifier_refuses_prompts_of_another_task() -> None:
    with pytest.raises(ValueError, match="counting task only"):
        RuleScorer().score(["Write a poem about the sea."], ["The sea..."])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sequence-classification model with the demo tokenizer and its chat template,
    saved the way a hub reward model is laid out."""
    tokenizer = demo.build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_the_templated_conversation(reward_model_dir: Path) -> None:
    scorer = build_scorer(
        EvaluationSpec(enabled=True, scorer=str(reward_model_dir), scorer_batch_size=2), "cpu"
    )
    assert isinstance(scorer, RewardModelScorer)
    prompts = [
        "count up by 1 from 1 to 4",
        "count down by 2 from 9 to 3",
        "count up by 3 from 0 to 9",
    ]
    responses = ["1 2 3 4", "9 7 5 3 1 0 0", "0 3"]  # different lengths: padded batches
    scores = scorer.score(prompts, responses)

    # What it must equal: the model's logit on each conversation alone, laid out by the
    # reward model's own chat template.
    text = scorer.text(prompts[0], responses[0])
    assert text == "<s><|user|> count up by 1 from 1 to 4 <|assistant|> 1 2 3 4</s> "
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = demo.build_demo_tokenizer()
    expected = []
    for prompt, response in zip(prompts, responses, strict=True):
        ids = tokenizer(scorer.text(prompt, response), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected.append(float(model(input_ids=ids).logits[0, 0]))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3  # the scores depend on the text


def test_a_classifier_with_several_outputs_is_refused(tmp_path: Path) -> None:
    tokenizer = demo.build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 outputs"):
        RewardModelScorer(str(tmp_path))


def test_no_scorer_and_the_rule_scorer_by_name() -> None:
    assert build_scorer(EvaluationSpec(scorer="none"), "cpu") is None
    assert isinstance(build_scorer(EvaluationSpec(scorer="builtin:rule"), "cpu"), RuleScorer)
