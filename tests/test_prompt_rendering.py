"""Prompts shown as the model saw them (engine/generation.py render_prompt, used by the
generations table and the report): the conversation's roles and text, and a mark where data
preparation cut the prompt, and from which side.

A ChatML tokenizer with SmolLM2-135M-Instruct's chat template is built here in milliseconds
(a byte-level BPE trained on a few sentences); the real SmolLM2 tokenizer is read from its
GGUF in the slow test at the end."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from simpo_sweep.engine import demo
from simpo_sweep.engine.data.normalize import PreferenceExample
from simpo_sweep.engine.data.tokenize import tokenize_examples
from simpo_sweep.engine.generation import (
    GenerationEvaluator,
    decode,
    left_truncated_prompts,
    render_prompt,
    select_prompts,
)
from simpo_sweep.service.report import PROMPT_CELL_CHARS, prompt_cell
from simpo_sweep.spec.models import EvaluationSpec

# HuggingFaceTB/SmolLM2-135M-Instruct's template: ChatML, with a default system turn.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TASK = "In this task, you are given a sentence in English. Translate it to French."
CORPUS = [
    DEFAULT_SYSTEM,
    TASK,
    "Sentence: The cat sat on the mat. Le chat est assis sur le tapis.",
    "system user assistant Be brief. Hello! Hi, bye. What is 2 + 2? It is 4.",
]


@pytest.fixture(scope="module")
def chatml() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer laid out like SmolLM2's: <|endoftext|>, <|im_start|> (its
    BOS) and <|im_end|> (its EOS and padding) as special tokens 0, 1, 2."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=special[1:],
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def _templated(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids as data preparation makes them (engine.data.tokenize)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def test_a_chatml_prompt_shows_its_roles(chatml: PreTrainedTokenizerFast) -> None:
    ids = _templated(chatml, [_user(TASK)])
    # Before: the markers dropped, the role names left as bare words.
    assert decode(chatml, ids, skip_special_tokens=True).startswith(f"system\n{DEFAULT_SYSTEM}")
    assert render_prompt(ids, chatml) == f"[system] {DEFAULT_SYSTEM}\n[user] {TASK}\n[assistant]"


def test_a_conversation_shows_every_turn_in_order(chatml: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        _user("Hi"),
        {"role": "assistant", "content": "Hello!"},
        _user("What is 2 + 2?"),
    ]
    assert render_prompt(_templated(chatml, messages), chatml) == (
        "[system] Be brief.\n[user] Hi\n[assistant] Hello!\n[user] What is 2 + 2?\n[assistant]"
    )


def _example(system: str, user: str) -> PreferenceExample:
    prompt = ([{"role": "system", "content": system}] if system else []) + [_user(user)]
    return PreferenceExample(
        prompt=prompt,  # type: ignore[arg-type]
        chosen=[{"role": "assistant", "content": "It is 4."}],  # type: ignore[list-item]
        rejected=[{"role": "assistant", "content": "Bye."}],  # type: ignore[list-item]
    )


def test_prompts_cut_by_data_preparation_are_the_ones_marked_as_cut_from_the_left(
    chatml: PreTrainedTokenizerFast,
) -> None:
    """Data preparation keeps a prompt's last max_prompt_length tokens; the split does not
    record which it cut, and the evaluation tells exactly those apart, including one cut at a
    turn boundary (it lacks the system turn every SmolLM2 prompt begins with)."""
    examples = [
        _example("", "What is 2 + 2?"),  # the default system turn: long, cut
        _example("Be brief.", "Hi"),  # short, kept whole
        _example("Be brief.", TASK + " " + TASK),  # long, cut
        _example("Be brief.", "What is 2 + 2? It is"),
    ]
    lengths = [len(_templated(chatml, example.prompt)) for example in examples]
    limit = sorted(lengths)[1] + 1  # two prompts fit, two are cut
    split, counts = tokenize_examples(
        examples,
        chatml,
        chat_template=SMOLLM2_CHAT_TEMPLATE,
        max_length=limit + 16,
        max_prompt_length=limit,
    )
    expected = [length > limit for length in lengths]
    assert counts.truncated_prompt == sum(expected) == 2
    assert left_truncated_prompts(split.prompt_ids, chatml, max_prompt_length=limit) == expected
    # Without max_prompt_length: the longest prompts of the split are the candidates.
    assert left_truncated_prompts(split.prompt_ids, chatml) == expected

    # Cut right at a turn: "<|im_start|>user ..." with the system turn before it dropped.
    whole = _templated(chatml, [_user(TASK)])
    user_turn = whole[whole.index(chatml.bos_token_id, 1) :]
    assert left_truncated_prompts([whole[:5], user_turn], chatml) == [False, True]


def test_a_prompt_cut_from_the_left_says_so_where_it_starts(
    chatml: PreTrainedTokenizerFast,
) -> None:
    ids = _templated(chatml, [_user(TASK)])[-12:]
    shown = render_prompt(ids, chatml, "left")
    assert shown.startswith("[… cut from the left: earlier tokens dropped, the last 12 kept] ")
    assert shown.endswith("French.\n[assistant]")
    assert "[user]" not in shown  # its marker was cut off with the start of the turn

    right = render_prompt(_templated(chatml, [_user(TASK)])[:8], chatml, "right")
    assert right.endswith(" [cut from the right: later tokens dropped, the first 8 kept …]")


def test_evaluation_prompts_carry_the_conversation_and_the_cut(
    chatml: PreTrainedTokenizerFast,
) -> None:
    whole = _templated(chatml, [_user("What is 2 + 2?")])
    cut = _templated(chatml, [_user(TASK)])[-len(whole) :]
    chosen = list(chatml("It is 4.<|im_end|>", add_special_tokens=False)["input_ids"])
    prompts = select_prompts([whole, cut], [chosen, chosen], chatml, num_prompts=2, seed=0)
    assert [prompt.cut for prompt in prompts] == [None, "left"]
    assert prompts[0].conversation == (
        f"[system] {DEFAULT_SYSTEM}\n[user] What is 2 + 2?\n[assistant]"
    )
    assert prompts[1].conversation.startswith("[… cut from the left")
    # What a scorer reads stays plain text.
    assert "<|im_start|>" not in prompts[0].prompt_text and "[user]" not in prompts[0].prompt_text


def test_the_demo_template_renders_with_its_role_tokens() -> None:
    tokenizer = demo.build_demo_tokenizer()
    ids = _templated(tokenizer, [_user("count up by 1 from 1 to 4")])
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<s>", "<|user|>"]
    assert render_prompt(ids, tokenizer) == "[user] count up by 1 from 1 to 4\n[assistant]"
    assert left_truncated_prompts([ids, ids[3:]], tokenizer, max_prompt_length=len(ids) - 3) == [
        False,
        True,
    ]
    assert render_prompt(ids[3:], tokenizer, "left") == (
        f"[… cut from the left: earlier tokens dropped, the last {len(ids) - 3} kept] "
        "up by 1 from 1 to 4\n[assistant]"
    )


def test_an_unknown_template_shows_its_text_with_its_special_tokens(
    chatml: PreTrainedTokenizerFast,
) -> None:
    """No recognised turn marker: the decoded text, special tokens kept, BOS/EOS/padding out."""
    text = "<|im_end|>Question: Hi<|endoftext|>Answer:"
    ids = list(chatml(text, add_special_tokens=False)["input_ids"])
    assert render_prompt(ids, chatml) == "Question: Hi<|endoftext|>Answer:"
    # A turn opener not followed by a role stays as it is.
    odd = list(chatml("<|im_start|>Be brief. Hi", add_special_tokens=False)["input_ids"])
    assert render_prompt(odd, chatml) == "<|im_start|>Be brief. Hi"
    # Without BOS or a template, nothing tells a cut prompt apart: none is said to be cut.
    chatml_plain = PreTrainedTokenizerFast(tokenizer_object=chatml.backend_tokenizer)
    assert left_truncated_prompts([ids, ids[2:], ids[:3]], chatml_plain) == [False] * 3


def test_the_generations_table_shows_the_conversation() -> None:
    tokenizer = demo.build_demo_tokenizer()
    model = demo.build_demo_model("builtin:tiny-llama", tokenizer, seed=0)
    whole = _templated(tokenizer, [_user("count up by 1 from 1 to 4")])
    chosen = list(tokenizer("1 2 3 4</s>", add_special_tokens=False)["input_ids"])
    prompts = select_prompts(
        [whole, whole[2:]],
        [chosen, chosen],
        tokenizer,
        num_prompts=2,
        seed=0,
        max_prompt_length=len(whole) - 2,
    )
    settings = EvaluationSpec(enabled=True, max_new_tokens=2, batch_size=2)
    evaluator = GenerationEvaluator(prompts, settings, tokenizer, None, every=10, device="cpu")
    table = evaluator.evaluate(model, step=10).table()
    assert table["prompt"] == [
        "[user] count up by 1 from 1 to 4\n[assistant]",
        f"[… cut from the left: earlier tokens dropped, the last {len(whole) - 2} kept] "
        "count up by 1 from 1 to 4\n[assistant]",
    ]
    assert table["prompt_cut"] == [None, "left"]
    assert table["prompt_tokens"] == [len(whole), len(whole) - 2]


def test_the_report_shows_a_prompt_in_one_cell_with_its_roles() -> None:
    shown = "[system] Be brief.\n[user] a | b\n[assistant]"
    assert prompt_cell(shown) == "[system] Be brief. [user] a \\| b [assistant]"
    long = "[system] " + "s" * 400 + "\n[user] " + "u" * 400 + " end?\n[assistant]"
    cell = prompt_cell(long)
    assert cell.startswith("[system] sss") and cell.endswith("uuu end? [assistant]")
    left_out = len(long) - PROMPT_CELL_CHARS
    assert f"[… {left_out} characters left out here …]" in cell


@pytest.mark.slow
def test_smollm2s_own_tokenizer_shows_roles_and_the_cut() -> None:
    """The issue's case, with the real SmolLM2-135M-Instruct tokenizer (read from its GGUF)."""
    from transformers import AutoTokenizer

    from simpo_sweep.engine import pretrained

    try:
        gguf = pretrained.gguf_path("builtin:smollm2-135m-instruct")
    except pretrained.BuiltinModelUnavailable as missing:
        pytest.skip(str(missing))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = _templated(tokenizer, [_user(TASK)])
    assert render_prompt(ids, tokenizer) == (
        f"[system] {DEFAULT_SYSTEM}\n[user] {TASK}\n[assistant]"
    )
    cut = ids[-10:]
    assert left_truncated_prompts([ids[:10], cut], tokenizer, max_prompt_length=10) == [
        False,
        True,
    ]
    assert render_prompt(cut, tokenizer, "left").startswith("[… cut from the left")
