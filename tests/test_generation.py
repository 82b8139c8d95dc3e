"""Generation evaluation (engine/generation.py): the metric formulas against hand-computed
cases, the length-controlled fit, prompt selection, batched left-padded generation, the
degenerate-generation verdict, and generation sliced over 2 gloo processes."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simpo_sweep.engine import demo
from simpo_sweep.engine.generation import (
    GenerationEvaluation,
    GenerationEvaluator,
    GenerationRecord,
    degenerate_generation_reasons,
    generate,
    generation_metrics,
    length_controlled_win_rate,
    metric_name,
    repetition,
    select_prompts,
    win,
)
from simpo_sweep.engine.scorers import RuleScorer
from simpo_sweep.engine.train import settle_collectives
from simpo_sweep.spec.models import EvaluationSpec

# ---- formulas ----------------------------------------------------------------------------------


def test_repetition_is_the_share_of_repeated_4grams() -> None:
    # 4-grams 1234 2341 3412 4123 1234: 5, of which 4 distinct.
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    # "Hi Hi Hi Hi Hi Hi": 3 four-grams, all the same.
    assert repetition([7] * 6) == pytest.approx(1 - 1 / 3)
    assert repetition([1, 2, 3, 4, 5]) == 0.0
    assert repetition([1, 2, 3]) is None  # no 4-gram at all


def test_a_tie_is_half_a_win() -> None:
    assert (win(2.0, 1.0), win(1.0, 1.0), win(0.0, 1.0)) == (1.0, 0.5, 0.0)


def _record(length: int, chosen_length: int, **fields: object) -> GenerationRecord:
    values: dict[str, object] = {
        "row": 0,
        "prompt": "p",
        "prompt_tokens": 1,
        "prompt_cut": None,
        "generation": "g",
        "chosen": "c",
        "length_tokens": length,
        "chosen_length_tokens": chosen_length,
        "truncated": False,
        "repetition": None,
        "score": None,
        "chosen_score": None,
    }
    values.update(fields)
    return GenerationRecord(**values)  # type: ignore[arg-type]


def test_generation_metrics_by_hand() -> None:
    records = [
        _record(4, 5, repetition=0.5, score=2.0, chosen_score=1.0),
        _record(6, 5, repetition=None, score=1.0, chosen_score=1.0, truncated=True),
        _record(2, 2, repetition=0.0, score=0.0, chosen_score=1.0),
    ]
    metrics = generation_metrics(records)
    assert metrics[metric_name("length_tokens")] == pytest.approx(4.0)
    assert metrics[metric_name("length_ratio")] == pytest.approx(4.0 / 4.0)
    # The generation without a 4-gram is left out of the repetition mean.
    assert metrics[metric_name("repetition")] == pytest.approx(0.25)
    assert metrics[metric_name("truncated")] == pytest.approx(1 / 3)
    assert metrics[metric_name("score")] == pytest.approx(1.0)
    assert metrics[metric_name("win_rate")] == pytest.approx((1 + 0.5 + 0) / 3)
    assert 0 < metrics[metric_name("lc_win_rate")] < 1


def test_unscored_generations_have_length_metrics_only() -> None:
    metrics = generation_metrics([_record(3, 6), _record(5, 6)])
    assert metrics == {
        metric_name("length_tokens"): 4.0,
        metric_name("length_ratio"): pytest.approx(4 / 6),
        metric_name("repetition"): 0.0,
        metric_name("truncated"): 0.0,
    }


def test_lc_win_rate_at_equal_lengths_is_the_win_rate() -> None:
    """With no length difference only the intercept moves: sigmoid(a) solves
    n * (sigmoid(a) - mean(win)) + l2 * a = 0, the win rate shrunk by a hair."""
    lc = length_controlled_win_rate([1, 1, 1, 0], [5, 7, 3, 4], [5, 7, 3, 4])
    assert lc == pytest.approx(0.75, abs=0.003) and lc < 0.75


def test_lc_win_rate_removes_a_win_rate_that_comes_from_length_only() -> None:
    """Wins depend on the length difference alone (P(win) = sigmoid(0.4 d)), and the
    generations are mostly longer: the raw win rate is high, the rate at equal length 1/2."""
    rng = np.random.default_rng(0)
    chosen = rng.integers(20, 60, size=4000).astype(float)
    differences = rng.normal(8.0, 10.0, size=4000).round()
    wins = (rng.random(4000) < 1 / (1 + np.exp(-0.4 * differences))).astype(float)
    assert wins.mean() > 0.7
    lc = length_controlled_win_rate(wins.tolist(), (chosen + differences).tolist(), chosen.tolist())
    assert lc == pytest.approx(0.5, abs=0.04)


def test_lc_fit_is_the_penalised_maximum_likelihood() -> None:
    """Against an independent optimiser (L-BFGS in torch) of the same objective, on data
    where wins also depend on quality: the same a, so the same lc_win_rate."""
    rng = np.random.default_rng(1)
    chosen = rng.integers(10, 40, size=200).astype(float)
    differences = rng.integers(-20, 30, size=200).astype(float)
    wins = (rng.random(200) < 1 / (1 + np.exp(-(0.8 + 0.1 * differences)))).astype(float)
    scale = chosen.mean()
    x = torch.tensor(differences / scale)
    y = torch.tensor(wins)
    weights = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=500, tolerance_grad=1e-12)

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        logits = weights[0] + weights[1] * x
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + 0.01 / 2 * (weights**2).sum()
        loss.backward()
        return loss

    optimiser.step(objective)
    expected = float(torch.sigmoid(weights[0].detach()))
    lc = length_controlled_win_rate(wins.tolist(), (chosen + differences).tolist(), chosen.tolist())
    assert lc == pytest.approx(expected, abs=1e-6)


def test_lc_fit_stays_finite_on_perfectly_separated_data() -> None:
    differences = [float(d) for d in range(-3, 12) if d != 0]
    wins = [1.0 if d > 0 else 0.0 for d in differences]
    chosen = [6.0] * len(differences)
    lc = length_controlled_win_rate(wins, [6.0 + d for d in differences], chosen)
    assert math.isfinite(lc) and 0 < lc < 1


def test_empty_answers_that_all_lose_have_a_low_lc_win_rate() -> None:
    """Every generation empty (d / s = -1) and losing: no equal-length data at all, and the
    fit must not extrapolate towards 1/2."""
    chosen = [4.0, 5.0, 6.0, 7.0] * 4
    assert length_controlled_win_rate([0.0] * 16, [0.0] * 16, chosen) < 0.05


# ---- the verdict -------------------------------------------------------------------------------


def _metrics(length: float, repeated: float, truncated: float) -> dict[str, float]:
    return {
        metric_name("length_tokens"): length,
        metric_name("repetition"): repeated,
        metric_name("truncated"): truncated,
    }


def test_degenerate_generation_rules() -> None:
    settings = EvaluationSpec(enabled=True, max_new_tokens=10)
    assert degenerate_generation_reasons(_metrics(5, 0.1, 0.0), settings, step=10) == []
    (repeating,) = degenerate_generation_reasons(_metrics(10, 0.8, 0.0), settings, step=10)
    assert "repetition 0.80" in repeating
    (short,) = degenerate_generation_reasons(_metrics(0.5, 0.0, 0.0), settings, step=10)
    assert "collapsed to 0.5 tokens" in short
    (endless,) = degenerate_generation_reasons(_metrics(10, 0.1, 1.0), settings, step=10)
    assert "100% ran to max_new_tokens" in endless


def test_a_model_is_judged_only_once_it_has_generated_well() -> None:
    """A random init repeats one token to max_new_tokens, and while it learns it answers with
    EOS alone for a while: not degenerate, not yet able. Once it has generated well, a fall
    into a rule is a degeneration."""
    settings = EvaluationSpec(enabled=True, max_new_tokens=10)
    prompts, chosen = _demo_prompts(1)
    tokenizer = demo.build_demo_tokenizer()
    evaluator = GenerationEvaluator(
        select_prompts(prompts, chosen, tokenizer, num_prompts=1, seed=0),
        settings,
        tokenizer,
        None,
        every=10,
        device="cpu",
    )

    def at(step: int, metrics: dict[str, float]) -> list[str]:
        return evaluator.degenerate_reasons(GenerationEvaluation(step, [], metrics, 0.0))

    assert at(0, _metrics(10, 0.9, 1.0)) == []  # random init: babbles
    assert at(10, _metrics(0.0, 0.0, 0.0)) == []  # the unigram stage: EOS alone
    assert at(20, _metrics(5, 0.0, 0.0)) == []  # answers
    (collapsed,) = at(30, _metrics(0.5, 0.0, 0.0))
    assert "collapsed to 0.5 tokens" in collapsed and "step 30" in collapsed


# ---- prompts and generating --------------------------------------------------------------------


def _demo_prompts(count: int) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = demo.build_demo_tokenizer()
    rows = demo.demo_preference_rows("builtin:rule-following", count, seed=0)
    prompts, chosen = [], []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        chosen.append(tokenizer(row["chosen"] + "</s>", add_special_tokens=False)["input_ids"])
    return prompts, chosen


def test_select_prompts_is_seeded_distinct_and_decoded() -> None:
    tokenizer = demo.build_demo_tokenizer()
    prompts, chosen = _demo_prompts(30)
    prompts, chosen = prompts + prompts[:5], chosen + chosen[:5]  # repeated prompts
    first = select_prompts(prompts, chosen, tokenizer, num_prompts=8, seed=3)
    again = select_prompts(prompts, chosen, tokenizer, num_prompts=8, seed=3)
    assert first == again and len(first) == 8
    assert len({tuple(prompt.prompt_ids) for prompt in first}) == 8
    assert select_prompts(prompts, chosen, tokenizer, num_prompts=8, seed=4) != first
    every = select_prompts(prompts, chosen, tokenizer, num_prompts=100, seed=3)
    assert len(every) == 30  # distinct prompts only
    sample = first[0]
    assert demo.rule_answer(sample.prompt_text) is not None, sample.prompt_text
    assert demo.follows_rule(sample.prompt_text, sample.chosen_text) is True
    assert tokenizer.eos_token_id not in sample.chosen_ids


def test_batched_left_padded_generation_matches_one_prompt_at_a_time() -> None:
    tokenizer = demo.build_demo_tokenizer()
    model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    # Demo prompts are all one length: cut some from the left (as max_prompt_length does).
    prompts = [ids[index % 3 :] for index, ids in enumerate(_demo_prompts(7)[0])]
    options = {
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": tokenizer.eos_token_id,
        "device": torch.device("cpu"),
    }
    batched = generate(model, prompts, EvaluationSpec(max_new_tokens=6, batch_size=4), **options)
    single = generate(model, prompts, EvaluationSpec(max_new_tokens=6, batch_size=1), **options)
    assert batched == single
    assert all(len(generation.tokens) <= 6 for generation in batched)


def test_sampling_is_seeded_and_leaves_the_training_rng_alone() -> None:
    tokenizer = demo.build_demo_tokenizer()
    model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    prompts, _ = _demo_prompts(4)
    options = {
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": tokenizer.eos_token_id,
        "device": torch.device("cpu"),
    }
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    sampled = EvaluationSpec(max_new_tokens=8, temperature=1.5, seed=1)
    first = generate(model, prompts, sampled, **options)
    assert torch.equal(torch.rand(3), expected_next)
    assert generate(model, prompts, sampled, **options) == first
    other_seed = sampled.model_copy(update={"seed": 2})
    assert generate(model, prompts, other_seed, **options) != first


# ---- 2 processes -------------------------------------------------------------------------------


def _evaluate_on_rank(rank: int, world_size: int, port: int, shard: bool, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tokenizer = demo.build_demo_tokenizer()
        model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
        if shard:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        prompts_ids, chosen_ids = _demo_prompts(5)
        prompts = select_prompts(prompts_ids, chosen_ids, tokenizer, num_prompts=5, seed=0)
        settings = EvaluationSpec(enabled=True, max_new_tokens=6, batch_size=2)
        evaluator = GenerationEvaluator(
            prompts, settings, tokenizer, RuleScorer(), every=10, device="cpu"
        )
        evaluation = evaluator.evaluate(model, step=10)
        Path(f"{out}.{rank}").write_bytes(pickle.dumps((evaluation.records, evaluation.metrics)))
        settle_collectives()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp2"])
def test_two_processes_generate_slices_and_every_rank_gets_all(tmp_path: Path, shard: bool) -> None:
    """5 prompts over 2 ranks: slices of 3 and 2 (padded to 3), generated in lockstep, gathered
    on both ranks, equal to what one process generates. Under FSDP2 each forward is a
    collective, so a rank that stepped less often than the other would hang the test."""
    from tests.conftest import free_port

    out = str(tmp_path / "records")
    mp.start_processes(
        _evaluate_on_rank,
        args=(2, free_port(), shard, out),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    rank0 = pickle.loads(Path(f"{out}.0").read_bytes())
    rank1 = pickle.loads(Path(f"{out}.1").read_bytes())
    assert rank0 == rank1

    tokenizer = demo.build_demo_tokenizer()
    model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    prompts_ids, chosen_ids = _demo_prompts(5)
    prompts = select_prompts(prompts_ids, chosen_ids, tokenizer, num_prompts=5, seed=0)
    settings = EvaluationSpec(enabled=True, max_new_tokens=6, batch_size=2)
    alone = GenerationEvaluator(prompts, settings, tokenizer, RuleScorer(), every=10, device="cpu")
    evaluation = alone.evaluate(model, step=10)
    records, metrics = rank0
    assert [record.row for record in records] == [prompt.row for prompt in prompts]
    assert [r.generation for r in records] == [r.generation for r in evaluation.records]
    assert metrics == evaluation.metrics


# ---- in a sweep --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model after 150 steps with an SFT term: it answers (ends with EOS, at about
    the chosen length, without repeating), saved with save_pretrained like a hub model."""
    from simpo_sweep.engine.data import prepare_data
    from simpo_sweep.engine.train import SimPOTrainer
    from simpo_sweep.spec.models import DataSpec, ModelSpec, SimPOSpec, TrainingSpec

    folder = tmp_path_factory.mktemp("answering-model")
    tokenizer = demo.build_demo_tokenizer()
    prepared = prepare_data(
        ModelSpec(), DataSpec(max_length=64, max_prompt_length=24), folder / "cache"
    )
    model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    training = TrainingSpec(learning_rate=3e-3, max_steps=150, batch_size=16, eval_every=150)
    trainer = SimPOTrainer(
        model,
        prepared.train,
        prepared.eval,
        training=training,
        simpo=SimPOSpec(sft_weight=1.0),
        pad_token_id=int(tokenizer.pad_token_id),
        device="cpu",
    )
    trainer.fit()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_sweep_reports_generations_and_stops_a_trial_whose_generations_collapse(
    tmp_path: Path, answering_model: Path
) -> None:
    """From a model that answers, lr 3e-2 drives it to answer with EOS alone within 10 steps
    while its loss stays finite (no other verdict sees it); lr 1e-4 trains on. Generation
    metrics reach Tune and MLflow, every evaluation's generations are a table of the child run,
    and the report puts the top trials' generations side by side."""
    from mlflow.tracking import MlflowClient

    from simpo_sweep.service.commands import generation_score_lines
    from simpo_sweep.service.report import GENERATIONS_FILE, prompt_cell, write_report
    from simpo_sweep.service.results import STATE_COMPLETED, STATE_DEGENERATE
    from simpo_sweep.service.sweep import run_sweep
    from simpo_sweep.spec.models import SweepSpec
    from simpo_sweep.tracking.mlflow_runs import SweepTracking, read_table

    storage = tmp_path / "runs"
    spec = SweepSpec.model_validate(
        {
            "name": "gen",
            "model": {"name": str(answering_model)},
            "data": {"max_length": 64, "max_prompt_length": 24},
            "training": {"max_steps": 20, "batch_size": 8, "eval_every": 10},
            "simpo": {"sft_weight": 1.0},
            "evaluation": {
                "enabled": True,
                "num_prompts": 8,
                "max_new_tokens": 10,
                "scorer": "builtin:rule",
            },
            "search": {
                "algorithm": "grid",
                "metric": "eval/generation/lc_win_rate",
                "space": {"learning_rate": {"type": "grid", "values": [1e-4, 3e-2]}},
            },
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "storage": {"path": str(storage)},
        }
    )
    outcome = run_sweep(spec, printer=lambda _line: None)
    by_lr = {row.params["learning_rate"]: row for row in outcome.rows}
    healthy, collapsed = by_lr[1e-4], by_lr[3e-2]
    assert (collapsed.state, collapsed.step) == (STATE_DEGENERATE, 10), collapsed.diagnosis
    assert "degenerate generations: they collapsed to" in collapsed.diagnosis
    assert collapsed.metrics["eval/generation/length_tokens"] < 2.0
    assert healthy.state == STATE_COMPLETED and healthy.metric is not None, healthy.diagnosis
    assert outcome.best is not None and outcome.best.trial_id == healthy.trial_id
    for name in ("length_tokens", "length_ratio", "repetition", "score", "win_rate"):
        assert f"eval/generation/{name}" in healthy.metrics, name
    assert healthy.metrics["eval/generation/truncated"] < 0.5

    uri = f"sqlite:///{storage.resolve() / 'mlflow.db'}"
    tracking = SweepTracking(uri, "gen", "gen", outcome.sweep_id)
    runs = tracking.child_runs()
    run_id = runs[healthy.trial_id].info.run_id
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "eval/generation/length_tokens")
    assert sorted(metric.step for metric in history) == [10, 20]
    assert client.get_metric_history(run_id, "perf/generation_s")
    tables = sorted(entry.path for entry in client.list_artifacts(run_id, "generations"))
    assert tables == [f"generations/step_{step:06d}.json" for step in (0, 10, 20)]
    rows = read_table(client, run_id, "generations/step_000020.json")
    assert len(rows) == 8
    # Prompts as the model saw them: the user turn and the generation prompt (none was cut).
    assert all(row["prompt"].startswith("[user] count ") for row in rows)
    assert all(row["prompt"].endswith("\n[assistant]") for row in rows)
    assert all(demo.rule_answer(row["prompt"][7:-12]) is not None for row in rows)
    assert {row["prompt_cut"] for row in rows} == {None}
    assert {"generation", "chosen", "score", "chosen_score", "length_tokens"} <= set(rows[0])
    collapsed_run = runs[collapsed.trial_id]
    assert collapsed_run.data.tags["simpo_sweep.state"] == STATE_DEGENERATE

    lines = generation_score_lines(spec, outcome.rows, outcome.best)
    assert healthy.trial_id in lines[1] and collapsed.trial_id in lines[2]

    write_report(spec, outcome.location, tracking)
    side_by_side = (outcome.sweep_dir / "report" / GENERATIONS_FILE).read_text()
    assert prompt_cell(rows[0]["prompt"]) in side_by_side and healthy.trial_id in side_by_side
    parent_files = [entry.path for entry in client.list_artifacts(tracking.parent_run_id)]
    assert GENERATIONS_FILE in parent_files


# ---- the spec ----------------------------------------------------------------------------------


def test_generation_metrics_are_search_metrics_only_where_they_are_measured() -> None:
    from pydantic import ValidationError

    from simpo_sweep.spec.models import SweepSpec

    def spec(metric: str, evaluation: dict[str, object], **search: object) -> SweepSpec:
        return SweepSpec.model_validate(
            {
                "name": "s",
                "training": {"max_steps": 100, "eval_every": 25},
                "evaluation": evaluation,
                "search": {"metric": metric, **search},
            }
        )

    rule = {"enabled": True, "scorer": "builtin:rule"}
    asha = {"scheduler": {"type": "asha", "grace_period": 50}}
    assert (
        spec("eval/generation/lc_win_rate", rule, **asha).evaluation.every_steps(
            SweepSpec(name="s").training
        )
        == 25
    )
    assert spec("eval/generation/repetition", {"enabled": True}, mode="min")
    for metric, evaluation, search, message in [
        ("eval/generation/score", {"enabled": False}, {}, "needs evaluation.enabled"),
        ("eval/generation/win_rate", {"enabled": True}, {}, "needs a scorer"),
        ("eval/generation/winrate", rule, {}, "no generation metric"),
        ("eval/generation/score", {**rule, "every": 75}, asha, "after ASHA's grace period"),
    ]:
        with pytest.raises(ValidationError, match=message):
            spec(metric, evaluation, **search)
    with pytest.raises(ValidationError, match="give a temperature too"):
        EvaluationSpec(top_p=0.9)
