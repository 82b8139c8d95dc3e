"""Pydantic models of a sweep spec: the single source of every default and validation rule.

A spec file has one section per concern (model, data, training, simpo, search, resources,
tracking, storage). The engine consumes `ModelSpec`, `DataSpec`, `TrainingSpec` and `SimPOSpec`
directly; the upper layers consume the rest.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(StrictModel):
    """LoRA adapters (peft.LoraConfig): the base model stays frozen in model.dtype."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: updates scale by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (or suffixes) that get adapters; all-linear = every linear "
        "layer but the LM head.",
    )


# The built-in models (the names after builtin:): the demo's randomly initialised and SFT tiny
# Llamas (engine/demo.py) and the real models converted from an installed package
# (engine/pretrained.py), which define them.
BUILTIN_MODEL_NAMES = ("tiny-llama", "tiny-llama-sft", "smollm2-135m-instruct")


class ModelSpec(StrictModel):
    name: str = Field(
        "builtin:tiny-llama",
        description="Hugging Face hub id, local path, or a built-in model: builtin:tiny-llama "
        "and builtin:tiny-llama-sft (the demo's tiny Llamas, built locally), "
        "builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, a real 135M instruct model "
        "installed by scripts/setup.sh and converted once into the cache).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or path; defaults to `name`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "The dtype weights are loaded and exported in (auto = float32 on CPU, bfloat16 on "
            "CUDA). Trained weights are held as training.precision says: float32 master "
            "weights under bf16-mixed and fp32, whatever this is."
        ),
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    lora: LoraSpec | None = Field(
        None,
        description="Train LoRA adapters through peft instead of every weight; None = full "
        "fine-tuning. Its fields are searchable (model.lora.r).",
    )

    @field_validator("name")
    @classmethod
    def _known_builtin(cls, name: str) -> str:
        if name.startswith("builtin:") and name.removeprefix("builtin:") not in BUILTIN_MODEL_NAMES:
            known = ", ".join(f"builtin:{known}" for known in BUILTIN_MODEL_NAMES)
            raise ValueError(f"unknown built-in model {name!r}; known: {known}")
        return name


class DataColumns(StrictModel):
    """Column names of the preference data (the row shapes they may hold: docs/simpo.md)."""

    prompt: str = Field(
        "prompt",
        description="The prompt (string or messages); optional when chosen/rejected are whole "
        "dialogues.",
    )
    chosen: str = "chosen"
    rejected: str = "rejected"
    conversations: str = Field(
        "conversations",
        description="ShareGPT / LLaMA-Factory: the shared turns ({from, value} list), read when "
        "the row has no prompt column.",
    )


class DataSpec(StrictModel):
    source: str = Field(
        "builtin:rule-following",
        description=(
            "Hub id, local jsonl/json/parquet/csv file, save_to_disk folder, or builtin:<name>."
        ),
    )
    split: str = "train"
    eval_split: str | None = Field(
        None, description="Held-out split; when absent, eval_fraction of `split` is held out."
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_pairs: int | None = Field(None, gt=0)
    max_eval_pairs: int | None = Field(None, gt=0)
    columns: DataColumns = Field(default_factory=DataColumns)
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's own."
    )
    max_length: int = Field(512, gt=1, description="Prompt + response tokens, per sequence.")
    max_prompt_length: int = Field(256, gt=0)
    seed: int = 0
    cache_dir: str | None = Field(
        None, description="Where tokenised data is cached; defaults to <storage.path>/data_cache."
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length}) so that responses keep at least one token"
            )
        return self


class TrainingSpec(StrictModel):
    learning_rate: PositiveFloat = 1e-3
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: PositiveFloat = 1e-8
    max_steps: int = Field(200, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Pairs per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(25, gt=0, description="Evaluate every N optimizer steps.")
    eval_batch_size: int = Field(32, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(
        2,
        gt=0,
        description="Checkpoints kept per trial: the last K (the final one among them); a "
        "sweep of 48 8B trials must not fill a disk.",
    )
    seed: int = 0
    precision: Literal["auto", "bf16-mixed", "fp32", "bf16-true"] = Field(
        "auto",
        description=(
            "bf16-mixed: float32 weights and optimizer state, bf16 compute (autocast, or FSDP's "
            "MixedPrecisionPolicy); fp32: float32 throughout; bf16-true: bfloat16 weights "
            "updated in place, which loses updates below 1/256 of a weight (most of them at "
            "learning rates near 1e-6). auto = bf16-mixed on CUDA, fp32 elsewhere."
        ),
    )
    compile_layers: bool = Field(
        False,
        description=(
            "torch.compile each decoder layer (CUDA): 1.36x the step speed of eager on a 0.5B "
            "Qwen2 on an H100 (bench/README.md), paid for with a minute of compiling."
        ),
    )
    padding_free: Literal["auto", "on", "off"] = Field(
        "auto", description="Pack chosen+rejected without padding where the attention allows."
    )
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "on: prompt + chosen + rejected as one sequence per pair under a 4D mask, the prompt "
            "computed once (sdpa/eager only); auto: off until measured on a GPU "
            "(1.14-1.33x faster on CPU, bench/README.md)."
        ),
    )
    max_tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description=(
            "Fill each worker's micro-batch with pairs up to this many tokens instead of "
            "batch_size pairs (the prompt counted twice, once under prefix sharing; padded "
            "layout: pairs x the widest pair): even, large steps on ragged data. The loss stays "
            "the mean over the step's pairs. At least 2 x data.max_length (the longest pair)."
        ),
    )
    logprob_chunk_tokens: int = Field(
        1024, gt=0, description="Response tokens projected through the LM head at once."
    )
    group_by_length: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed_mixed_precision(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mixed_precision" in data:
            raise ValueError(
                "training.mixed_precision was replaced by training.precision: "
                "bf16 -> bf16-mixed (float32 master weights, bf16 compute), no -> fp32, "
                "auto -> auto"
            )
        return data


class SimPOSpec(StrictModel):
    beta: PositiveFloat = 2.0
    gamma_beta_ratio: float = Field(0.5, ge=0, description="Target margin divided by beta.")
    # An input alias only: the validator below converts it, so it is None on every validated
    # spec and left out of dumps (spec.yaml, best_config.yaml, MLflow params).
    gamma: float | None = Field(
        None,
        ge=0,
        exclude=True,
        description="Absolute target margin (other libraries' convention); converted to "
        "gamma_beta_ratio = gamma / beta. Give one or the other, never both. Not searchable: "
        "search gamma_beta_ratio.",
    )
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    sft_weight: float = Field(0.0, ge=0)
    average_log_prob: bool = True

    @model_validator(mode="before")
    @classmethod
    def _absolute_gamma(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gamma") is not None:
            if data.get("gamma_beta_ratio") is not None:
                raise ValueError(
                    "give gamma_beta_ratio or the absolute gamma, not both "
                    "(gamma = gamma_beta_ratio * beta)"
                )
            data = dict(data)
            beta = float(data.get("beta", cls.model_fields["beta"].default))
            data["gamma_beta_ratio"] = float(data.pop("gamma")) / beta
        return data

    @model_validator(mode="after")
    def _smoothing_is_sigmoid_only(self) -> SimPOSpec:
        if self.loss_type == "hinge" and self.label_smoothing != 0:
            raise ValueError(
                "label_smoothing applies to the sigmoid loss only; set it to 0 for hinge"
            )
        return self


class DiagnosticsSpec(StrictModel):
    """Thresholds of docs/simpo.md that turn metrics into a verdict."""

    stop_degenerate: bool = Field(True, description="Stop a trial as soon as it turns degenerate.")
    low_margin: float = Field(0.5, description="Reward margin below this late in training.")
    high_margin: float = Field(5.0, description="Reward margin above this: over-fitting.")
    collapse_drop: float = Field(
        5.0,
        gt=0,
        description="Collapse: both mean log-probs this many nats per token below their values "
        "at the trial's first step. Relative, because where a model starts depends on it: a "
        "random init sits near -log(vocab size), -10.4 for a 32k vocabulary.",
    )
    late_fraction: float = Field(
        0.5, gt=0, le=1, description="'Late in training' = past this fraction of max_steps."
    )
    window_steps: int = Field(
        8,
        gt=0,
        description="The rules on a trial's level (collapse, not learning preferences, "
        "over-fitting) read held-out metrics when the trial was evaluated within this many "
        "steps, otherwise the mean of its last this-many train steps: one step's batch is too "
        "few pairs to judge a trial by. NaN/inf loss and positive log-probs are judged per step.",
    )
    accuracy_lag: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Over-fitting, with a recent evaluation at hand: a train reward margin above "
        "high_margin and eval/rewards/accuracies more than this below train's (window mean).",
    )


# Names under eval/generation/ that a generation evaluation reports (engine/generation.py
# defines them); the scored ones need a scorer.
GENERATION_METRIC_PREFIX = "eval/generation/"
GENERATION_LENGTH_METRICS = ("length_tokens", "length_ratio", "repetition", "truncated")
GENERATION_SCORED_METRICS = ("score", "win_rate", "lc_win_rate")
GENERATION_METRICS = GENERATION_LENGTH_METRICS + GENERATION_SCORED_METRICS
RULE_SCORER = "builtin:rule"
NO_SCORER = "none"


class EvaluationSpec(StrictModel):
    """Generation evaluation (engine/generation.py): every `every` optimizer steps and at the
    end, each trial generates for the same seeded held-out prompts and scores what it wrote."""

    enabled: bool = False
    every: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps between generation evaluations; default training."
        "eval_every. training.max_steps or more: at the end only.",
    )
    num_prompts: int = Field(
        64, gt=0, description="Distinct held-out prompts, drawn from the eval split with `seed`."
    )
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(16, gt=0, description="Prompts generated at once, per worker.")
    temperature: float | None = Field(
        None, gt=0, description="Sample at this temperature; not given: greedy decoding."
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling; needs a temperature."
    )
    seed: int = Field(0, description="Draws the prompts and seeds sampling.")
    scorer: str = Field(
        NO_SCORER,
        description=f"{RULE_SCORER} (the demo task's verifier), a reward model (Hugging Face "
        f"sequence-classification hub id or local path), or {NO_SCORER} (length and "
        "repetition only).",
    )
    scorer_revision: str | None = None
    scorer_batch_size: int = Field(8, gt=0)
    scorer_max_length: int = Field(2048, gt=1, description="Reward model input tokens.")
    max_repetition: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Degenerate: mean repetition (1 - distinct/total 4-grams) above this.",
    )
    min_length_tokens: float = Field(
        2.0, ge=0, description="Degenerate: mean generated length below this many tokens."
    )
    max_truncated_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Degenerate: more than this share of generations ran to max_new_tokens.",
    )

    @model_validator(mode="after")
    def _top_p_samples(self) -> EvaluationSpec:
        if self.top_p is not None and self.temperature is None:
            raise ValueError("top_p applies to sampling: give a temperature too (1.0 to keep it)")
        return self

    @property
    def sampling(self) -> bool:
        return self.temperature is not None

    @property
    def scored(self) -> bool:
        return self.scorer != NO_SCORER

    def every_steps(self, training: TrainingSpec) -> int:
        return self.every if self.every is not None else training.eval_every


# ---- search space ---------------------------------------------------------------------------


class ChoiceDomain(StrictModel):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class GridDomain(StrictModel):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class _RangeDomain(StrictModel):
    low: float
    high: float
    q: float | None = Field(None, gt=0, description="Quantisation step.")

    @model_validator(mode="after")
    def _ordered(self) -> _RangeDomain:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class UniformDomain(_RangeDomain):
    type: Literal["uniform"]


class LogUniformDomain(_RangeDomain):
    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive(self) -> LogUniformDomain:
        if self.low <= 0:
            raise ValueError(f"log-uniform bounds must be > 0, got low={self.low}")
        return self


class IntDomain(StrictModel):
    type: Literal["int"]
    low: int
    high: int = Field(description="Inclusive.")
    q: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntDomain:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


Domain = Annotated[
    ChoiceDomain | GridDomain | UniformDomain | LogUniformDomain | IntDomain,
    Field(discriminator="type"),
]


def domain_values_to_check(domain: Any) -> list[Any]:
    """The values whose validity decides whether a domain is possible for its field."""
    if isinstance(domain, ChoiceDomain | GridDomain):
        return list(domain.values)
    if isinstance(domain, UniformDomain | LogUniformDomain | IntDomain):
        return [domain.low, domain.high]
    raise TypeError(domain)


class ASHASpec(StrictModel):
    type: Literal["asha"]
    grace_period: int = Field(50, gt=0, description="Training steps before a trial can be stopped.")
    reduction_factor: float = Field(3.0, gt=1)


class NoScheduler(StrictModel):
    type: Literal["none"]


class StageSpec(StrictModel):
    """One stage of a staged search: its own space, starting from the best of the stage before."""

    name: str
    space: dict[str, Domain]
    num_samples: int | None = Field(None, gt=0)


class SearchSpec(StrictModel):
    space: dict[str, Domain] = Field(default_factory=dict)
    algorithm: Literal["grid", "random", "optuna"] = "random"
    scheduler: ASHASpec | NoScheduler = Field(
        default_factory=lambda: NoScheduler(type="none"), discriminator="type"
    )
    metric: str = "eval/rewards/accuracies"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(
        4,
        gt=0,
        description=(
            "Samples; with grid domains, repeats of the grid. Default 4, or 1 when the "
            "algorithm is grid (a grid is usually meant once)."
        ),
    )
    max_concurrent_trials: int = Field(2, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    seed: int | None = 0
    stages: list[StageSpec] = Field(default_factory=list)

    @property
    def spaces(self) -> list[dict[str, Domain]]:
        """The spaces trials are drawn from: each stage's in a staged search, else the one."""
        return [stage.space for stage in self.stages] or [self.space]

    @model_validator(mode="before")
    @classmethod
    def _grid_runs_once_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("algorithm") == "grid":
            return {"num_samples": 1, **data}
        return data

    @model_validator(mode="after")
    def _algorithm_fits_space(self) -> SearchSpec:
        spaces = [self.space, *(stage.space for stage in self.stages)]
        has_grid = any(
            isinstance(domain, GridDomain) for space in spaces for domain in space.values()
        )
        if has_grid and self.algorithm == "optuna":
            raise ValueError("grid domains need algorithm grid or random; use choice with optuna")
        if self.stages and self.space:
            raise ValueError("give either space or stages (each with its own space), not both")
        return self


class ResourcesSpec(StrictModel):
    num_workers: int = Field(1, gt=0, description="Ray Train workers per trial.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="Fractions pack small trials on a GPU.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description=(
            "How several workers share a trial: ddp (a whole replica per worker) or fsdp "
            "(FSDP2: parameters, gradients and optimizer state sharded across workers). auto = "
            "fsdp when the memory plan says a replica does not fit one worker's GPU, else ddp."
        ),
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU (80 for an H100/A100-80G). Known, the memory plan "
        "refuses a spec that cannot fit it; a fractional gpus_per_worker gets its share.",
    )
    trial_driver_cpus: float = Field(
        0.1, ge=0, description="CPU of the Tune trial that drives the Train run; keep it small."
    )
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial from its checkpoint.")
    single_worker_in_trial: bool = Field(
        True,
        description=(
            "Run a single-worker trial's loop inside the Tune trial (Ray Train local mode) "
            "instead of starting a worker group: saves the group's start, 20 s or more a trial."
        ),
    )

    @property
    def loop_in_trial(self) -> bool:
        """The trial's training loop runs in the Tune trial's own process (no worker group)."""
        return self.num_workers == 1 and self.single_worker_in_trial

    @property
    def driver_cpus(self) -> float:
        """CPUs a trial holds besides its workers'."""
        return 0.0 if self.loop_in_trial else self.trial_driver_cpus

    @model_validator(mode="after")
    def _fractional_gpus_single_worker(self) -> ResourcesSpec:
        fractional = 0 < self.gpus_per_worker < 1
        if fractional and self.num_workers > 1:
            raise ValueError(
                "fractional gpus_per_worker works for single-worker trials only "
                "(DDP or FSDP workers sharing a GPU fail in NCCL)"
            )
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError("gpus_per_worker above 1 must be a whole number")
        return self


class TrackingSpec(StrictModel):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: sqlite:///<storage.path>/mlflow.db."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the sweep name.")
    enabled: bool = True


class StorageSpec(StrictModel):
    path: str = Field(
        "simpo_runs",
        description="Checkpoints and Tune state; shared storage on a multi-node cluster.",
    )
    shared_filesystem: bool = Field(
        False,
        description="The path is a mount (NFS, EFS, ...) that every node of the cluster sees.",
    )
    keep_best_trials: int = Field(
        2,
        ge=1,
        description="Trials whose weights stay once they have ended: the best K by the search "
        "metric (their last checkpoint, without its optimizer state). Every other ended trial's "
        "checkpoints are deleted, and a trial's are deleted as soon as it falls out of the "
        "best K. Failed trials keep their last whole checkpoint (resume retries them).",
    )


class ExportSpec(StrictModel):
    """What the sweep hands back at its end: the winning model, out of the checkpoints."""

    best: bool = Field(
        False,
        description="Export the best trial as a Hugging Face folder (<sweep>/export/<trial>), "
        "log it to the trial's MLflow run and register it.",
    )
    register_model: bool = Field(True, description="Register the exported model in MLflow.")
    model_name: str | None = Field(
        None, description="Registered model name; default: the MLflow experiment's name."
    )
    merge_lora: bool = Field(False, description="A LoRA trial: merged weights, not the adapter.")


class SweepSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    simpo: SimPOSpec = Field(default_factory=SimPOSpec)
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment the sweep's runs go to: tracking.experiment, else the name."""
        return self.tracking.experiment or self.name

    @model_validator(mode="after")
    def _scheduler_fits_training(self) -> SweepSpec:
        scheduler = self.search.scheduler
        if isinstance(scheduler, ASHASpec) and scheduler.grace_period > self.training.max_steps:
            raise ValueError(
                f"search.scheduler.grace_period ({scheduler.grace_period} steps) exceeds "
                f"training.max_steps ({self.training.max_steps}): no trial could ever be stopped"
            )
        return self

    def _values_trials_take(self, keys: tuple[str, ...], fixed: Any) -> list[Any]:
        """The values of a field that trials can train with: its searched domain's values or
        bounds (any stage's) when the space names it under one of `keys`, else `fixed`."""
        values = [
            value
            for space in self.search.spaces
            for key, domain in space.items()
            if key in keys
            for value in domain_values_to_check(domain)
        ]
        return values or [fixed]

    @model_validator(mode="after")
    def _token_budget_holds_the_longest_pair(self) -> SweepSpec:
        # Checked for the hardest trial the space allows: its smallest budget with its
        # longest sequences (a pair longer than the budget cannot be put in any micro-batch).
        budgets = self._values_trials_take(
            ("max_tokens_per_batch", "training.max_tokens_per_batch"),
            self.training.max_tokens_per_batch,
        )
        lengths = self._values_trials_take(("data.max_length",), self.data.max_length)
        # Values of the wrong type are reported by the per-value check of the space.
        numbers = [value for value in budgets if isinstance(value, int | float)]
        numeric_lengths = [value for value in lengths if isinstance(value, int | float)]
        if not numbers or not numeric_lengths:
            return self
        budget, max_length = min(numbers), max(numeric_lengths)
        if budget < 2 * max_length:
            searched = budgets != [self.training.max_tokens_per_batch] or lengths != [
                self.data.max_length
            ]
            raise ValueError(
                f"training.max_tokens_per_batch ({budget:g}) is below the longest pair: "
                f"2 x data.max_length = {2 * max_length:g} tokens"
                + (
                    " (the smallest budget and longest length the search allows)"
                    if searched
                    else ""
                )
                + "; raise it or lower data.max_length"
            )
        return self

    @model_validator(mode="after")
    def _generation_metric_is_evaluated(self) -> SweepSpec:
        metric = self.search.metric
        if not metric.startswith(GENERATION_METRIC_PREFIX):
            return self
        name = metric.removeprefix(GENERATION_METRIC_PREFIX)
        evaluation = self.evaluation
        if name not in GENERATION_METRICS:
            known = ", ".join(GENERATION_METRIC_PREFIX + known for known in GENERATION_METRICS)
            raise ValueError(f"search.metric {metric!r} is no generation metric; known: {known}")
        if not evaluation.enabled:
            raise ValueError(f"search.metric {metric!r} needs evaluation.enabled: true")
        if name in GENERATION_SCORED_METRICS and not evaluation.scored:
            raise ValueError(
                f"search.metric {metric!r} needs a scorer (evaluation.scorer: {RULE_SCORER} "
                "or a reward model); with scorer none only length and repetition are measured"
            )
        scheduler = self.search.scheduler
        every = evaluation.every_steps(self.training)
        if isinstance(scheduler, ASHASpec) and every > scheduler.grace_period:
            # ASHA compares trials at its rungs: a trial reaching the first one before its
            # first generation evaluation would be judged on a missing metric.
            raise ValueError(
                f"evaluation runs every {every} steps, after ASHA's grace period "
                f"({scheduler.grace_period}): with search.metric {metric!r}, set "
                "evaluation.every to at most the grace period"
            )
        return self


class TrialConfig(StrictModel):
    """Everything one trial trains with: the spec's fixed sections, sampled values applied."""

    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    simpo: SimPOSpec
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
