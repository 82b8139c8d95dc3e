"""`inspect_data`: check a spec's data the way preparing it would, on a sample, writing nothing.

For `simpo-sweep validate`: the file exists and parses (a broken line named by its number), the
columns the spec names are there (else the file's columns and the nearest one), the first rows
normalise (every bad row listed at once), and what preparing them gives (DataSummary).
A hub data set that cannot be reached from here is noted and skipped, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simpo_sweep.engine.data.cache import build_splits
from simpo_sweep.engine.data.normalize import count_shapes, normalize_rows
from simpo_sweep.engine.data.sources import SourceUnavailable, sample_source
from simpo_sweep.engine.data.summary import DataSummary
from simpo_sweep.engine.models import load_tokenizer
from simpo_sweep.spec.models import DataSpec, ModelSpec

# Rows read from each source: enough to meet most row shapes and problems of a data set, few
# enough that validate answers in seconds.
DEFAULT_SAMPLE_ROWS = 200


@dataclass(frozen=True)
class DataInspection:
    """What inspecting the data found. `summary` is None when the rows were not tokenised here
    (the source or the tokenizer cannot be reached); `notes` say what was skipped and why."""

    source: str
    summary: DataSummary | None
    rows_checked: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        if self.summary is not None:
            lines = self.summary.lines()
        else:
            lines = [f"data: {self.source}"]
            if self.rows_checked:
                shapes = " + ".join(f"{name} ({count} rows)" for name, count in self.shapes.items())
                lines.append(f"  {self.rows_checked} rows checked; shape: {shapes}")
        return lines + [f"  note: {note}" for note in self.notes]

    def format(self) -> str:
        return "\n".join(self.lines())


def inspect_data(
    model: ModelSpec, data: DataSpec, *, sample_rows: int = DEFAULT_SAMPLE_ROWS
) -> DataInspection:
    """The first `sample_rows` rows of each source, read and prepared in memory.

    Raises DataError (DataProblems when there are several: every broken line, missing column
    or bad row of the sample) for what preparing the data would also fail on.
    """
    if sample_rows <= 0:
        raise ValueError(f"sample_rows must be > 0, got {sample_rows}")
    try:
        sampled = sample_source(data, sample_rows)
    except SourceUnavailable as unavailable:
        return DataInspection(source=data.source, summary=None, notes=(str(unavailable),))
    train, evaluation = sampled.train, sampled.eval
    notes: list[str] = []
    for sample in (train, evaluation):
        if sample is not None and sample.total_rows and sample.total_rows > len(sample.rows):
            notes.append(
                f"{sample.description}: checked the first {len(sample.rows)} of its "
                f"{sample.total_rows} rows"
            )
    try:
        tokenizer = load_tokenizer(model)
    except Exception as error:  # hub or path errors: the model is validate's to report
        # Without the tokenizer the rows can still be normalised: every row problem is found.
        examples = normalize_rows(train.rows, data.columns, train.description, lines=train.lines)
        if evaluation is not None:
            examples += normalize_rows(
                evaluation.rows, data.columns, evaluation.description, lines=evaluation.lines
            )
        notes.append(
            f"tokenizer {model.tokenizer or model.name!r} cannot be loaded here ({error}); "
            "rows were checked, token lengths and identical pairs were not"
        )
        return DataInspection(
            source=data.source,
            summary=None,
            rows_checked=len(examples),
            shapes=count_shapes(examples),
            notes=tuple(notes),
        )
    built = build_splits(
        train.rows,
        evaluation.rows if evaluation is not None else None,
        data=data,
        tokenizer=tokenizer,
        location=train.description,
        eval_location=evaluation.description if evaluation is not None else "",
        train_lines=train.lines,
        eval_lines=evaluation.lines if evaluation is not None else None,
        container=train.container,
        eval_container=evaluation.container if evaluation is not None else "",
        sample_rows=sample_rows,
    )
    summary = built.summary
    return DataInspection(
        source=data.source,
        summary=summary,
        rows_checked=summary.rows_read,
        shapes=summary.shapes,
        notes=tuple(notes),
    )
