#!/usr/bin/env bash
# Engine on a GPU, third round, in one go (~7-8 min on one H100/H200), everything under $OUT:
#   1. the 1.5B preset at 2048 tokens (cuda_1p5b_2k), 4 pairs a step: trl, ours,
#      ours+compile+varlen, liger, ours+compile, ours+compile+shared, each with one profiled step;
#   2. bench/gpu_checks.py: bf16 vs fp32, FSDP2 on one rank, prefix sharing and varlen against
#      the padded path, the memory plan against the allocator's peak, three trials in a process;
#   3. the 0.5B preset at 2048 tokens (cuda_2k): trl, liger, ours, ours+compile+varlen;
#   then summary.json (tokens/s, MFU, peak memory, ratios to TRL, profile breakdowns).
# A peer is not started once BUDGET_S seconds have passed, so the run ends inside its lease.
#
#   OUT=/some/dir bash bench/gpu_round3.sh              # the GPU round (carry .whl/)
#   TINY=1 OUT=/tmp/r3 bash bench/gpu_round3.sh         # CPU check of the script (tiny presets)
#
# The device returns at most 8 files: per-peer files and profiles are packed into two archives.
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)

if ! "$PY" -c "import trl, pydantic, liger_kernel" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if [[ -n "${TINY:-}" ]]; then
    DEVICE=cpu
    BIG=tiny_prompt_heavy SMALL=tiny PAIRS_BIG=4
    CHECKS=(--device cpu --small)
    BIG_PEERS=(trl liger ours ours+shared)
    SMALL_PEERS=(trl ours)
    TIMEOUT=240
    BUDGET_S=${BUDGET_S:-1500}
else
    DEVICE=cuda
    # 1.5B at 8 pairs x 2048: TRL's padded batch and full logits would not fit in 141 GB
    BIG=cuda_1p5b_2k SMALL=cuda_2k PAIRS_BIG=4
    CHECKS=(--device cuda)
    BIG_PEERS=(trl ours ours+compile+varlen liger ours+compile ours+compile+shared)
    SMALL_PEERS=(trl liger ours ours+compile+varlen)
    TIMEOUT=150
    BUDGET_S=${BUDGET_S:-420}
    nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || true
fi

"$PY" - <<'EOF' > "$WORK/versions.txt" 2>&1 || true
import platform, torch, transformers
print(platform.platform(), "torch", torch.__version__, "transformers", transformers.__version__)
for name in ("trl", "liger_kernel", "triton"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as error:
        print("no", name, error)
EOF
cat "$WORK/versions.txt"

run_peers() {  # preset pairs peers...
    local preset=$1 pairs=$2
    shift 2
    for peer in "$@"; do
        if (( SECONDS > BUDGET_S )); then
            echo "skipping $preset $peer: ${SECONDS}s spent (budget ${BUDGET_S}s)" | tee -a "$WORK/skipped.txt"
            continue
        fi
        echo "== $preset $peer ($(date +%T), ${SECONDS}s in)"
        "$PY" bench/engine_vs_trl.py --device "$DEVICE" --preset "$preset" --pairs "$pairs" \
            --peers "$peer" --timeout "$TIMEOUT" --json "$WORK/${preset}__${peer//+/-}.json" \
            --profile "$WORK/profile_$preset" 2>&1 | tee -a "$WORK/$preset.log" | grep -v Warning
    done
}

# PEERS_BIG / PEERS_SMALL (space-separated, "none" for no peer) rerun a part of the round
[[ -n "${PEERS_BIG:-}" ]] && read -ra BIG_PEERS <<< "${PEERS_BIG/none/}"
[[ -n "${PEERS_SMALL:-}" ]] && read -ra SMALL_PEERS <<< "${PEERS_SMALL/none/}"
run_peers "$BIG" "$PAIRS_BIG" ${BIG_PEERS[@]+"${BIG_PEERS[@]}"}
echo "== checks ($(date +%T), ${SECONDS}s in)"
timeout 200 "$PY" bench/gpu_checks.py "${CHECKS[@]}" --json "$OUT/checks.json" 2>&1 \
    | tee "$WORK/checks.log" | grep -v Warning | cut -c1-600
run_peers "$SMALL" 8 ${SMALL_PEERS[@]+"${SMALL_PEERS[@]}"}

# One summary: per preset and peer the rows bench/README.md tabulates, ratios to TRL, breakdowns.
"$PY" - "$WORK" "$DEVICE" "$OUT/summary.json" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "bench")
import torch
from engine_vs_trl import PeerResult, Preset, summarise

work, device, target = Path(sys.argv[1]), torch.device(sys.argv[2]), Path(sys.argv[3])
summary = {}
for path in sorted(work.glob("*__*.json")):
    raw = json.loads(path.read_text())
    preset_name = path.stem.split("__")[0]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["preset"].items()}
    preset = Preset(**fields)
    entry = summary.setdefault(preset_name, {"machine": raw.get("machine"), "preset": raw["preset"], "peers": {}})
    for peer, result in raw.items():
        if peer in ("preset", "machine"):
            continue
        if not isinstance(result, dict):
            entry["peers"][peer] = {"peer": peer, "preset": preset_name, "error": str(result)[:800]}
            continue
        row = summarise(PeerResult(**result), preset, device)
        breakdown = work / f"profile_{preset_name}" / f"profile_{peer.replace('+', '-')}.breakdown.json"
        entry["peers"][peer] = {
            "peer": peer,
            "preset": preset_name,
            "gpu": result.get("gpu"),
            "layout": result["layout"],
            "notes": result.get("notes"),
            "tokens_per_s": row.tokens_per_s,
            "step_ms": row.step_ms,
            "step_seconds": result["step_seconds"],
            "mfu": row.mfu,
            "mfu_useful": row.mfu_useful,
            "peak_bytes": result["peak_bytes"],
            "padding": 1 - result["tokens"] / result["slots"],
            "first_step_logps_chosen": result["first_step_logps_chosen"],
            "profile": json.loads(breakdown.read_text()) if breakdown.exists() else None,
        }
for entry in summary.values():
    reference = entry["peers"].get("trl", {})
    for values in entry["peers"].values():
        if "tokens_per_s" in values and "tokens_per_s" in reference:
            values["tokens_per_s_vs_trl"] = values["tokens_per_s"] / reference["tokens_per_s"]
            values["memory_vs_trl"] = values["peak_bytes"] / reference["peak_bytes"]
target.write_text(json.dumps(summary, indent=2))
for name, entry in summary.items():
    for peer, values in entry["peers"].items():
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()
                 if k not in ("profile", "step_seconds", "notes", "preset", "gpu")}
        print(name, shown)
EOF

# At most 8 files come back: the summary and checks (above), the logs, tables, breakdowns and
# raw JSON in one archive, and the chrome traces of the big preset's trl and ours peers in another.
cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
tar -czf "$OUT/traces.tar.gz" -C "$WORK" $(cd "$WORK" && ls profile_"$BIG"/profile_{trl,ours,ours-compile-varlen}.trace.json 2>/dev/null) 2>/dev/null || true
find "$WORK" -name "*.trace.json" -delete
tar -czf "$OUT/results.tar.gz" -C "$WORK" .
ls -la "$OUT"
echo "done in ${SECONDS}s; files in $OUT"
