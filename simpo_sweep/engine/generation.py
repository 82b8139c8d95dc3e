"""Generation evaluation: what a trial's model writes for held-out prompts, and how good it is.

Reward margins and accuracies can rise while a model's own generations collapse ("Hi Hi Hi")
or run on without end: preference metrics score the data's responses, never the model's. So
every `evaluation.every` optimizer steps and at the end, a trial generates for a fixed, seeded
set of distinct held-out prompts (`select_prompts`), batched with left padding, greedy unless
a temperature is given, and scores each generation with a scorer (engine.scorers).

Metrics, under `eval/generation/`, means over the prompts:

    length_tokens  generated tokens before the EOS (max_new_tokens when none came)
    length_ratio   length_tokens / the chosen responses' mean length for the same prompts
                   (their tokens before the EOS)
    repetition     1 - distinct 4-grams / total 4-grams of each generation's tokens, averaged
                   over the generations that have a 4-gram (4 tokens or more); 0 when none has
    truncated      share of generations that reached max_new_tokens without an EOS
    score          mean scorer output over the generations (scored runs only, as below)
    win_rate       mean over prompts of win_i = 1 if score(generation_i) > score(chosen_i),
                   1/2 if equal (AlpacaEval's tie), 0 if below; the chosen responses are
                   scored by the same scorer
    lc_win_rate    the win rate at equal length (AlpacaEval 2's length control): with
                   d_i = length_i - chosen_length_i and s = the chosen responses' mean length
                   (so d / s is the relative length difference, -1 for an empty answer),
                   fit P(win_i) = sigmoid(a + b * d_i / s) by maximum likelihood with an L2
                   penalty (l2 / 2) * (a^2 + b^2), l2 = 0.01, so perfectly separated data
                   stays finite (Newton steps), and report sigmoid(a): the win rate a
                   generation of the chosen response's length would have. Scaling by the
                   chosen length rather than by std(d) keeps d / s of order 1, so sigmoid(a)
                   is never read far outside the data (all answers empty and all losing give
                   about 0.02, not an extrapolation towards 1/2).

Degenerate generations (`degenerate_generation_reasons`): repetition above
`max_repetition`, a mean length below `min_length_tokens`, or more than `max_truncated_share`
of the generations truncated. Like log-prob collapse (docs/simpo.md), it is a fall, not a
floor: a trial is judged only once its model has generated well, at its start (the model
before its first update, `GenerationEvaluator.set_baseline`) or at a later evaluation. A random
init repeats one token to max_new_tokens, and while it learns it passes through answering with
EOS alone (the unigram stage: EOS is the commonest token of the responses); neither is a
degeneration, it has not learned to generate yet. A model that generated well and that
training drives into one of the rules has degenerated.

Distributed (DDP and FSDP alike): rank r generates and scores the r-th slice of the prompts;
slices are padded to equal length (the padding is dropped afterwards) and generate() keeps
stepping until every rank is done (`synced_gpus`), so every rank runs the same number of
forward passes, as FSDP's collectives need. The records are then gathered to EVERY rank with
all_gather_object, so every rank computes the same metrics and the same verdict and all stop at
the same step (Ray Train's report is a barrier).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine.scorers import Scorer
from simpo_sweep.spec.models import GENERATION_METRIC_PREFIX, EvaluationSpec

NGRAM = 4
# The L2 penalty of the length-controlled fit: large enough to keep perfectly separated data
# finite (|a|, |b| stay below about 10 for a few hundred prompts), small enough to leave the
# estimate of a balanced sample alone.
LC_L2 = 0.01
LC_NEWTON_STEPS = 50

GENERATION_TIME = "perf/generation_s"
GENERATION_TOTAL_TIME = "perf/generation_total_s"


def metric_name(name: str) -> str:
    return GENERATION_METRIC_PREFIX + name


# ---- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt and its chosen response, as token ids and as text."""

    row: int  # index in the eval split
    prompt_ids: list[int]  # templated, with the generation prompt: what the model trained on
    chosen_ids: list[int]  # the chosen response's tokens before its EOS
    prompt_text: str  # decoded without special tokens (template markers): what a scorer reads
    chosen_text: str


def _content(ids: Sequence[int], eos_token_id: int | None) -> list[int]:
    """Tokens before the first EOS."""
    tokens = list(ids)
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id)]
    return tokens


def decode(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], *, skip_special_tokens: bool = False
) -> str:
    """Token ids as text, stripped. A generation keeps its special tokens: a model that writes
    template markers instead of an answer should be seen doing it."""
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return str(text).strip()


def select_prompts(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_prompts: int,
    seed: int,
) -> list[EvalPrompt]:
    """`num_prompts` distinct prompts of the eval split (all when it has fewer), drawn with
    `seed`: the same prompts for every trial of a sweep and every evaluation of a trial."""
    first_row: dict[tuple[int, ...], int] = {}
    for row in range(len(prompt_ids)):
        first_row.setdefault(tuple(prompt_ids[row]), row)
    rows = list(first_row.values())
    if len(rows) > num_prompts:
        rows = sorted(random.Random(seed).sample(rows, num_prompts))
    eos = tokenizer.eos_token_id
    prompts = []
    for row in rows:
        prompt, chosen = list(prompt_ids[row]), _content(chosen_ids[row], eos)
        prompts.append(
            EvalPrompt(
                row=row,
                prompt_ids=prompt,
                chosen_ids=chosen,
                prompt_text=decode(tokenizer, prompt, skip_special_tokens=True),
                chosen_text=decode(tokenizer, chosen),
            )
        )
    return prompts


# ---- generating -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # before the EOS
    truncated: bool  # reached max_new_tokens without an EOS


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: EvaluationSpec,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    device: torch.device,
    synced: bool = False,
) -> list[Generation]:
    """Generations for token-id prompts, `settings.batch_size` at a time, left-padded.

    `synced`: keep calling forward until every rank's batch is done (generate's
    `synced_gpus`), for sharded (FSDP) models whose forward is a collective. Sampling draws
    from a forked RNG seeded with `settings.seed`: the training's random stream is untouched,
    and every evaluation draws the same way.
    """
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            for start in range(0, len(prompts), settings.batch_size):
                batch = [list(ids) for ids in prompts[start : start + settings.batch_size]]
                width = max(len(ids) for ids in batch)
                input_ids = torch.tensor(
                    [[pad_token_id] * (width - len(ids)) + ids for ids in batch], device=device
                )
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
                )
                sampling = (
                    {"do_sample": True, "temperature": settings.temperature}
                    | ({"top_p": settings.top_p} if settings.top_p is not None else {})
                    if settings.sampling
                    else {"do_sample": False}
                )
                output = model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=settings.max_new_tokens,
                    min_new_tokens=0,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                    use_cache=True,
                    synced_gpus=synced,
                    **sampling,
                )
                for row in output[:, width:].tolist():
                    tokens = _content(row, eos_token_id)
                    truncated = len(tokens) >= settings.max_new_tokens
                    results.append(Generation(tokens[: settings.max_new_tokens], truncated))
    finally:
        model.train(was_training)
    return results


# ---- metrics ----------------------------------------------------------------------------------


def repetition(tokens: Sequence[int], n: int = NGRAM) -> float | None:
    """1 - distinct n-grams / total n-grams; None when there is no n-gram (< n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def win(score: float, chosen_score: float) -> float:
    """1 above the chosen response, 0 below, 1/2 for a tie (AlpacaEval's convention)."""
    if score > chosen_score:
        return 1.0
    return 0.5 if score == chosen_score else 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
    return result


def length_controlled_win_rate(
    wins: Sequence[float],
    lengths: Sequence[float],
    chosen_lengths: Sequence[float],
    *,
    l2: float = LC_L2,
) -> float:
    """sigmoid(a) of the penalised logistic fit P(win) = sigmoid(a + b * d / s), with
    d = length - chosen length and s = mean chosen length (at least 1 token).

    `wins` in [0, 1] (ties as 1/2: the binomial likelihood takes fractional outcomes). Newton's
    method on the penalised negative log-likelihood, which is strictly convex (l2 > 0), so the
    steps converge from zero without a line search.
    """
    y = np.asarray(wins, dtype=np.float64)
    chosen = np.asarray(chosen_lengths, dtype=np.float64)
    d = np.asarray(lengths, dtype=np.float64) - chosen
    if y.size == 0 or not y.size == d.size == chosen.size:
        raise ValueError(
            f"need one win and two lengths per prompt, got {y.size}, {d.size}, {chosen.size}"
        )
    scale = max(float(chosen.mean()), 1.0)
    features = np.stack([np.ones_like(d), d / scale], axis=1)
    weights = np.zeros(2)
    for _ in range(LC_NEWTON_STEPS):
        p = _sigmoid(features @ weights)
        gradient = features.T @ (p - y) + l2 * weights
        hessian = (features.T * (p * (1 - p))) @ features + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(_sigmoid(np.array(weights[0])))


@dataclass(frozen=True)
class GenerationRecord:
    """One prompt's generation, its measures and scores: a row of the MLflow table."""

    row: int
    prompt: str
    generation: str
    chosen: str
    length_tokens: int
    chosen_length_tokens: int
    truncated: bool
    repetition: float | None
    score: float | None
    chosen_score: float | None


def generation_metrics(records: Sequence[GenerationRecord]) -> dict[str, float]:
    """The eval/generation/ metrics of the module docstring, over all records."""
    if not records:
        raise ValueError("no generations to measure")
    lengths = np.array([record.length_tokens for record in records], dtype=np.float64)
    chosen_lengths = np.array([record.chosen_length_tokens for record in records], np.float64)
    repetitions = [record.repetition for record in records if record.repetition is not None]
    metrics = {
        metric_name("length_tokens"): float(lengths.mean()),
        metric_name("length_ratio"): float(lengths.mean() / max(chosen_lengths.mean(), 1e-9)),
        metric_name("repetition"): float(np.mean(repetitions)) if repetitions else 0.0,
        metric_name("truncated"): float(np.mean([record.truncated for record in records])),
    }
    scored = [
        (record.score, record.chosen_score)
        for record in records
        if record.score is not None and record.chosen_score is not None
    ]
    if len(scored) == len(records):
        wins = [win(score, chosen) for score, chosen in scored]
        metrics[metric_name("score")] = float(np.mean([score for score, _ in scored]))
        metrics[metric_name("win_rate")] = float(np.mean(wins))
        metrics[metric_name("lc_win_rate")] = length_controlled_win_rate(
            wins, lengths.tolist(), chosen_lengths.tolist()
        )
    return metrics


# ---- the verdict ------------------------------------------------------------------------------


def degenerate_generation_reasons(
    metrics: dict[str, float],
    settings: EvaluationSpec,
    *,
    step: int,
) -> list[str]:
    """Which rules these generations break (empty when none). Whether breaking them is a
    degeneration is the caller's to decide: GenerationEvaluator judges a model only once it
    has generated well."""
    repetition_now = metrics[metric_name("repetition")]
    length_now = metrics[metric_name("length_tokens")]
    truncated_now = metrics[metric_name("truncated")]

    def breaks(key: str) -> bool:
        return _rule_holds(key, metrics[metric_name(key)], settings)

    reasons = []
    if breaks("repetition"):
        reasons.append(
            f"degenerate generations: repetition {repetition_now:.2f} > "
            f"{settings.max_repetition} at step {step} (the same 4-grams over and over); lower "
            "the learning rate or add an SFT term (simpo.sft_weight)"
        )
    if breaks("length_tokens"):
        reasons.append(
            f"degenerate generations: they collapsed to {length_now:.1f} tokens on average "
            f"(< {settings.min_length_tokens}) at step {step}; lower the learning rate or add "
            "an SFT term (simpo.sft_weight)"
        )
    if breaks("truncated"):
        reasons.append(
            f"degenerate generations: {truncated_now:.0%} ran to max_new_tokens "
            f"({settings.max_new_tokens}) without an end at step {step} (> "
            f"{settings.max_truncated_share:.0%}): the model no longer ends its answers; lower "
            "the learning rate or add an SFT term (simpo.sft_weight)"
        )
    return reasons


def _rule_holds(key: str, value: float, settings: EvaluationSpec) -> bool:
    if key == "repetition":
        return value > settings.max_repetition
    if key == "length_tokens":
        return value < settings.min_length_tokens
    return value > settings.max_truncated_share


# ---- one evaluation, on every rank ------------------------------------------------------------


@dataclass
class GenerationEvaluation:
    step: int
    records: list[GenerationRecord]
    metrics: dict[str, float]
    seconds: float

    def table(self) -> dict[str, list[object]]:
        """Column name -> values, one row per prompt (MLflow's log_table takes this)."""
        rows = [asdict(record) for record in self.records]
        return {column: [row[column] for row in rows] for column in rows[0]} if rows else {}


class GenerationEvaluator:
    """Held-out prompts chosen once, the chosen responses scored once, then one
    `evaluate(model, step)` per evaluation step, on every rank of a trial."""

    def __init__(
        self,
        prompts: Sequence[EvalPrompt],
        settings: EvaluationSpec,
        tokenizer: PreTrainedTokenizerBase,
        scorer: Scorer | None,
        *,
        every: int,
        device: torch.device | str,
    ):
        if not prompts:
            raise ValueError("generation evaluation needs at least one held-out prompt")
        self.prompts = list(prompts)
        self.settings = settings
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.every = every
        self.device = torch.device(device)
        self.rank, self.world_size = _world()
        self.total_seconds = 0.0
        # The last evaluation at which no rule held: a fall is judged from there on.
        self.baseline: dict[str, float] | None = None
        self._chosen_scores: list[float] | None = None

    def due(self, step: int, max_steps: int) -> bool:
        """Every `every` optimizer steps, and at the last."""
        return step % self.every == 0 or step >= max_steps

    def _my_slice(self) -> tuple[list[EvalPrompt], int]:
        """This rank's prompts, padded with copies of its last (or the first) prompt to the
        same count on every rank; and how many of them are real."""
        per_rank = math.ceil(len(self.prompts) / self.world_size)
        mine = self.prompts[self.rank * per_rank : (self.rank + 1) * per_rank]
        real = len(mine)
        filler = mine[-1] if mine else self.prompts[0]
        return mine + [filler] * (per_rank - real), real

    def _scores(self, prompts: Sequence[EvalPrompt], responses: Sequence[str]) -> list[float]:
        assert self.scorer is not None
        return self.scorer.score([prompt.prompt_text for prompt in prompts], list(responses))

    def evaluate(self, model: nn.Module, step: int) -> GenerationEvaluation:
        started = time.perf_counter()
        mine, real = self._my_slice()
        generations = generate(
            model,
            [prompt.prompt_ids for prompt in mine],
            self.settings,
            pad_token_id=int(self.tokenizer.pad_token_id),
            eos_token_id=self.tokenizer.eos_token_id,
            device=self.device,
            synced=self.world_size > 1,
        )[:real]
        mine = mine[:real]
        texts = [decode(self.tokenizer, generation.tokens) for generation in generations]
        scores: list[float | None] = [None] * real
        chosen_scores: list[float | None] = [None] * real
        if self.scorer is not None and real:
            scores = list(self._scores(mine, texts))
            # The chosen responses do not change: scored once, at the first evaluation.
            if self._chosen_scores is None:
                self._chosen_scores = self._scores(mine, [prompt.chosen_text for prompt in mine])
            chosen_scores = list(self._chosen_scores)
        local = [
            GenerationRecord(
                row=prompt.row,
                prompt=prompt.prompt_text,
                generation=text,
                chosen=prompt.chosen_text,
                length_tokens=len(generation.tokens),
                chosen_length_tokens=len(prompt.chosen_ids),
                truncated=generation.truncated,
                repetition=repetition(generation.tokens),
                score=score,
                chosen_score=chosen_score,
            )
            for prompt, generation, text, score, chosen_score in zip(
                mine, generations, texts, scores, chosen_scores, strict=True
            )
        ]
        records = local
        if self.world_size > 1:
            gathered: list[list[GenerationRecord] | None] = [None] * self.world_size
            dist.all_gather_object(gathered, local)
            records = [record for part in gathered for record in (part or [])]
        seconds = time.perf_counter() - started
        self.total_seconds += seconds
        return GenerationEvaluation(step, records, generation_metrics(records), seconds)

    def set_baseline(self, model: nn.Module) -> GenerationEvaluation:
        """Evaluate the model before its first update: if it generates well, a fall from here
        is a degeneration."""
        evaluation = self.evaluate(model, step=0)
        self.degenerate_reasons(evaluation)
        return evaluation

    def degenerate_reasons(self, evaluation: GenerationEvaluation) -> list[str]:
        """Why this evaluation's generations are degenerate: empty until the model has once
        generated well (see the module docstring), and when they are good."""
        reasons = degenerate_generation_reasons(
            evaluation.metrics, self.settings, step=evaluation.step
        )
        if not reasons:
            self.baseline = dict(evaluation.metrics)
            return []
        return reasons if self.baseline is not None else []
