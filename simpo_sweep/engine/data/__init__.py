"""Preference data: load, normalise, apply the chat template, tokenise, truncate, cache.

    sources     source (hub id | jsonl/json/parquet/csv file | save_to_disk folder |
                builtin:<name>) -> rows
    normalize   rows -> PreferenceExample (prompt, chosen, rejected as message lists), whatever
                the row shape (strings, message lists, hh-rlhf dialogues, ShareGPT)
    tokenize    -> token ids (prompt ids; chosen/rejected = response ids only, ending with EOS)
                -> truncation (prompt from the left, then responses to fit max_length); empty
                and identical pairs dropped and counted
    summary     DataSummary: rows, pairs kept and dropped by reason, truncation, token lengths
    cache       -> arrow files in <cache_dir>/<fingerprint>/, built once and memory-mapped by
                every trial (prepare_data, load_prepared)
    inspection  inspect_data: the same checks on the first rows, nothing written (validate)

Dependencies point up that list: each module imports only the ones above it.
"""

from simpo_sweep.engine.data.cache import (
    DATA_FORMAT_VERSION,
    MANIFEST_NAME,
    BuiltSplits,
    PreparedData,
    build_splits,
    data_fingerprint,
    hold_out_by_prompt,
    load_prepared,
    prepare_data,
)
from simpo_sweep.engine.data.inspection import DEFAULT_SAMPLE_ROWS, DataInspection, inspect_data
from simpo_sweep.engine.data.normalize import (
    SHAPE_HH,
    SHAPE_MESSAGES,
    SHAPE_SHAREGPT,
    SHAPE_STRINGS,
    DataError,
    DataProblems,
    Message,
    PreferenceExample,
    normalize_row,
    normalize_rows,
)
from simpo_sweep.engine.data.sources import (
    LOCAL_FILE_FORMATS,
    ResolvedSource,
    SourceUnavailable,
    resolve_source,
)
from simpo_sweep.engine.data.summary import DataSummary, SplitCounts, TokenLengths
from simpo_sweep.engine.data.tokenize import (
    DROP_REASONS,
    ID_COLUMNS,
    TokenIdColumn,
    TokenizeCounts,
    TokenizedSplit,
    TruncatedPair,
    effective_chat_template,
    tokenize_examples,
    truncate_pair,
)

__all__ = [
    "DATA_FORMAT_VERSION",
    "DEFAULT_SAMPLE_ROWS",
    "DROP_REASONS",
    "ID_COLUMNS",
    "LOCAL_FILE_FORMATS",
    "MANIFEST_NAME",
    "SHAPE_HH",
    "SHAPE_MESSAGES",
    "SHAPE_SHAREGPT",
    "SHAPE_STRINGS",
    "BuiltSplits",
    "DataError",
    "DataInspection",
    "DataProblems",
    "DataSummary",
    "Message",
    "PreferenceExample",
    "PreparedData",
    "ResolvedSource",
    "SourceUnavailable",
    "SplitCounts",
    "TokenIdColumn",
    "TokenLengths",
    "TokenizeCounts",
    "TokenizedSplit",
    "TruncatedPair",
    "build_splits",
    "data_fingerprint",
    "effective_chat_template",
    "hold_out_by_prompt",
    "inspect_data",
    "load_prepared",
    "normalize_row",
    "normalize_rows",
    "prepare_data",
    "resolve_source",
    "tokenize_examples",
    "truncate_pair",
]
