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

Prompts are shown (the `prompt` column of the generations table, the report) as the model saw
them (`render_prompt`): the conversation with its roles, "[system] ...\n[user] ...\n[assistant]",
and a mark where data preparation cut the prompt (`left_truncated_prompts`). Scorers read the
plain text instead (`EvalPrompt.prompt_text`, decoded without special tokens).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

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


# Which side of a prompt was cut off: data preparation keeps a prompt's last max_prompt_length
# tokens (engine.data.tokenize.truncate_pair), so a prepared prompt is only ever cut on the left.
PromptCut = Literal["left", "right"]


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt and its chosen response, as token ids and as text."""

    row: int  # index in the eval split
    prompt_ids: list[int]  # templated, with the generation prompt: what the model trained on
    chosen_ids: list[int]  # the chosen response's tokens before its EOS
    prompt_text: str  # decoded without special tokens (template markers): what a scorer reads
    chosen_text: str
    # The prompt as the model saw it, for people: roles, text and the cut (render_prompt).
    conversation: str
    cut: PromptCut | None  # which side data preparation cut off, if it did


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


# ---- showing prompts ----------------------------------------------------------------------------

# Special tokens that open a turn whose role is the text right after them, up to a line break
# (ChatML's "<|im_start|>user\n", Gemma's "<start_of_turn>model\n") or up to a header closer
# (Llama 3's "<|start_header_id|>user<|end_header_id|>").
TURN_OPENERS = frozenset({"<|im_start|>", "<start_of_turn>", "<|start_header_id|>"})
HEADER_CLOSERS = frozenset({"<|end_header_id|>"})
# Special tokens that end a turn. They are left out, as the tokenizer's BOS, EOS and padding
# are: the next role (or a line break) shows where a turn ends.
TURN_ENDERS = frozenset(
    {"<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "</s>"}
)
# A special token that is a role itself: "<|user|>" (the demo's template, Zephyr's, Phi-3's).
ROLE_TOKEN = re.compile(r"<\|(system|user|assistant|tool|ipython|developer|human|model)\|>")
# What the text after a turn opener must look like to be read as the turn's role.
ROLE_NAME = re.compile(r"[A-Za-z_][\w-]{0,31}")


def cut_mark(cut: PromptCut, kept_tokens: int) -> str:
    """The visible mark of a cut prompt: at its start when cut from the left, at its end when
    cut from the right."""
    if cut == "left":
        return f"[… cut from the left: earlier tokens dropped, the last {kept_tokens} kept]"
    return f"[cut from the right: later tokens dropped, the first {kept_tokens} kept …]"


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's special tokens: BOS, EOS and the like, and added special tokens (turn
    markers, which a tokenizer need not list among its named special tokens)."""
    ids = {int(token_id) for token_id in tokenizer.all_special_ids}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(token_id) for token_id, token in added.items() if getattr(token, "special", 0))
    return ids


def _segments(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[tuple[bool, str]]:
    """(is_special, text) runs of the prompt: each special token on its own, the text between
    them decoded together."""
    special = _special_ids(tokenizer)
    segments: list[tuple[bool, str]] = []
    run: list[int] = []
    for token_id in ids:
        if int(token_id) not in special:
            run.append(int(token_id))
            continue
        if run:
            segments.append((False, str(tokenizer.decode(run))))
            run = []
        segments.append((True, str(tokenizer.convert_ids_to_tokens(int(token_id)))))
    if run:
        segments.append((False, str(tokenizer.decode(run))))
    return segments


def prompt_turns(
    prompt_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str | None, str]]:
    """(role, text) of each turn of a templated prompt, in order. Role None: text outside any
    recognised turn (a prompt cut inside a turn starts with one, and a template whose turn
    markers are not recognised gives only such text). Turn markers, BOS, EOS and padding are
    left out; any other special token stays in the text, as it is."""
    noise = {
        str(token)
        for token in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
        if token
    }
    turns: list[tuple[str | None, list[str]]] = [(None, [])]
    opener: str | None = None  # a turn opener whose role has not been read yet
    for is_special, piece in _segments(prompt_ids, tokenizer):
        if opener is not None:
            name, _, rest = piece.partition("\n")
            if not is_special and ROLE_NAME.fullmatch(name.strip()):
                turns.append((name.strip(), [rest]))
                opener = None
                continue
            turns[-1][1].append(opener)  # not followed by a role: shown as it is
            opener = None
        role_token = ROLE_TOKEN.fullmatch(piece) if is_special else None
        if not is_special:
            turns[-1][1].append(piece)
        elif piece in TURN_OPENERS:
            opener = piece
        elif role_token is not None:
            turns.append((role_token.group(1), []))
        elif piece in TURN_ENDERS or piece in noise:
            turns.append((None, []))
        elif piece not in HEADER_CLOSERS:
            turns[-1][1].append(piece)
    if opener is not None:
        turns[-1][1].append(opener)
    joined = [(role, "".join(parts).strip()) for role, parts in turns]
    return [(role, text) for role, text in joined if role is not None or text]


def render_prompt(
    prompt_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    truncated: PromptCut | None = None,
) -> str:
    """A templated prompt as the model saw it, for people to read: one line per turn,
    "[role] text", the generation prompt as a last "[assistant]", and `cut_mark` where the
    prompt was cut (`truncated`: from which side).

        [system] You are a helpful AI assistant named SmolLM, trained by Hugging Face
        [user] In this task, you are given a sentence. ...
        [assistant]

    A template whose turn markers are not recognised shows as its text with its special
    tokens (all but BOS, EOS and padding, which end a line), never without them."""
    lines = [
        text if role is None else f"[{role}] {text}".rstrip()
        for role, text in prompt_turns(prompt_ids, tokenizer)
    ]
    body = "\n".join(lines)
    if truncated == "left":
        return f"{cut_mark('left', len(prompt_ids))} {body}".rstrip()
    if truncated == "right":
        return f"{body} {cut_mark('right', len(prompt_ids))}".lstrip()
    return body


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    prefix = list(sequences[0])
    for sequence in sequences[1:]:
        length = 0
        while length < min(len(prefix), len(sequence)) and prefix[length] == sequence[length]:
            length += 1
        prefix = prefix[:length]
    return prefix


# Conversations rendered to find what every templated prompt begins with; templates that
# reject one (no system role, say) are read from the others.
_START_PROBES = (
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "b"}],
    [{"role": "system", "content": "c"}, {"role": "user", "content": "d"}],
)


def template_start(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every prompt templated by `tokenizer` begins with: with a chat template,
    what it writes before the first message's content differs (BOS and `<|im_start|>system` for
    SmolLM2's, whose default system turn comes first; `<s>` for the demo's); without one, what
    the tokenizer puts before plain text (its BOS, if it adds one). Empty when nothing is."""
    rendered: list[list[int]] = []
    if tokenizer.chat_template:
        for messages in _START_PROBES:
            try:
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # templates raise anything (jinja errors, raise_exception)
                continue
            rendered.append(list(tokenizer(str(text), add_special_tokens=False)["input_ids"]))
    else:
        rendered = [list(tokenizer(text)["input_ids"]) for text in ("a", "b")]
    return _common_prefix(rendered) if len(rendered) >= 2 else []


def left_truncated_prompts(
    prompt_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None = None,
) -> list[bool]:
    """Which prompts of a prepared split data preparation cut from the left.

    The split keeps no record of it, so it is told from the tokens: a cut prompt holds exactly
    `max_prompt_length` tokens (the longest prompt of the split when not given: a cut prompt
    always is one) and does not begin as every templated prompt does (`template_start`). The
    prompts shorter than that were never cut; if one of them does not begin with the
    tokenizer's template start, the data was templated otherwise (the spec's own template) and
    the start is the special token all of them begin with instead. With no start to go by (no
    template and no BOS), no prompt is said to be cut. A prompt cut exactly before a turn that
    begins the way templated prompts do is not seen as cut."""
    prompts = [list(ids) for ids in prompt_ids]
    if not prompts:
        return []
    limit = max_prompt_length if max_prompt_length is not None else max(map(len, prompts))
    uncut = [ids for ids in prompts if len(ids) < limit]
    start = template_start(tokenizer)
    if not start or any(ids[: len(start)] != start for ids in uncut):
        firsts = {ids[0] for ids in uncut if ids}
        start = list(firsts) if len(firsts) == 1 and firsts <= _special_ids(tokenizer) else []
    if not start:
        return [False] * len(prompts)
    return [len(ids) >= limit and ids[: len(start)] != start for ids in prompts]


def select_prompts(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_prompts: int,
    seed: int,
    max_prompt_length: int | None = None,
) -> list[EvalPrompt]:
    """`num_prompts` distinct prompts of the eval split (all when it has fewer), drawn with
    `seed`: the same prompts for every trial of a sweep and every evaluation of a trial.
    `max_prompt_length`: the data's, to tell the prompts it cut (left_truncated_prompts)."""
    first_row: dict[tuple[int, ...], int] = {}
    for row in range(len(prompt_ids)):
        first_row.setdefault(tuple(prompt_ids[row]), row)
    rows = list(first_row.values())
    if len(rows) > num_prompts:
        rows = sorted(random.Random(seed).sample(rows, num_prompts))
    cut_rows = left_truncated_prompts(prompt_ids, tokenizer, max_prompt_length=max_prompt_length)
    eos = tokenizer.eos_token_id
    prompts = []
    for row in rows:
        prompt, chosen = list(prompt_ids[row]), _content(chosen_ids[row], eos)
        cut: PromptCut | None = "left" if cut_rows[row] else None
        prompts.append(
            EvalPrompt(
                row=row,
                prompt_ids=prompt,
                chosen_ids=chosen,
                prompt_text=decode(tokenizer, prompt, skip_special_tokens=True),
                chosen_text=decode(tokenizer, chosen),
                conversation=render_prompt(prompt, tokenizer, cut),
                cut=cut,
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
    prompt: str  # the conversation as the model saw it, cut marked (render_prompt)
    prompt_tokens: int
    prompt_cut: PromptCut | None  # the side data preparation cut the prompt on, if it did
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
                prompt=prompt.conversation,
                prompt_tokens=len(prompt.prompt_ids),
                prompt_cut=prompt.cut,
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
