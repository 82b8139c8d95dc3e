"""Scorers of generations: a number per (prompt, response), higher is better.

    builtin:rule   the demo task's verifier: 1.0 when the response is exactly the count the
                   prompt's rule asks for (engine.demo.follows_rule), else 0.0
    <model>        a reward model: a Hugging Face sequence-classification model with one
                   output (hub id or local path), with its own tokenizer and chat template,
                   loaded once per worker; the score is its logit for prompt + response
    none           no scorer (build_scorer returns None): length and repetition only

Prompts reach a scorer as text: the policy's templated prompt decoded without its special
tokens (the prepared data keeps token ids only). A reward model reads it as one user turn
laid out by its own chat template, so a multi-turn prompt arrives flattened into that turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine import demo
from simpo_sweep.spec.models import NO_SCORER, RULE_SCORER, EvaluationSpec

# Between prompt and response for a reward model without a chat template.
PLAIN_SEPARATOR = "\n\n"


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class RuleScorer:
    """The demo task's verifier: does the response follow the prompt's counting rule?"""

    name = RULE_SCORER

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = []
        for prompt, response in zip(prompts, responses, strict=True):
            follows = demo.follows_rule(prompt, response)
            if follows is None:
                raise ValueError(
                    f"{RULE_SCORER} verifies the built-in counting task only "
                    f"(data.source builtin:rule-following); this prompt states no counting "
                    f"rule: {prompt[:200]!r}"
                )
            scores.append(1.0 if follows else 0.0)
        return scores


class RewardModelScorer:
    """A sequence-classification reward model scoring prompt + response with its own
    tokenizer and chat template."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        batch_size: int = 8,
        max_length: int = 2048,
        dtype: torch.dtype | None = None,
    ):
        self.name = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision
        )
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, revision=revision, dtype=dtype
        )
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward model {name_or_path!r} has {model.config.num_labels} outputs; a "
                "scorer needs a sequence-classification model with one (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # Sequence classifiers read the last non-pad token: they must know the pad id.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        # Right padding: the last real token is where the classifier reads its score.
        self.tokenizer.padding_side = "right"
        self.model = torch.nn.Module.to(model, device=self.device).eval()

    def text(self, prompt: str, response: str) -> str:
        """What the reward model reads: its chat template's conversation, else plain text."""
        if self.tokenizer.chat_template:
            conversation = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            rendered = self.tokenizer.apply_chat_template(conversation, tokenize=False)
            assert isinstance(rendered, str)
            return rendered
        return prompt + PLAIN_SEPARATOR + response

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        # A chat template writes BOS and turn markers itself.
        add_special_tokens = not self.tokenizer.chat_template
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
            ).logits
            scores += logits[:, 0].float().tolist()
        return scores


def build_scorer(settings: EvaluationSpec, device: torch.device | str) -> Scorer | None:
    """The spec's scorer (None for `none`); a reward model is loaded here, once."""
    if settings.scorer == NO_SCORER:
        return None
    if settings.scorer == RULE_SCORER:
        return RuleScorer()
    return RewardModelScorer(
        settings.scorer,
        device=device,
        revision=settings.scorer_revision,
        batch_size=settings.scorer_batch_size,
        max_length=settings.scorer_max_length,
    )
