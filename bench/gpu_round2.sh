#!/usr/bin/env bash
# Engine speed, second GPU round, in one go (~5-8 min on one H100/H200):
#   trl vs ours vs ours+shared (prefix sharing) for the Qwen2-0.5B preset (`cuda`) and the
#   prompt-heavy Qwen2-1.5B preset (`cuda_1p5b`), in the same run: tokens/s, MFU, peak memory,
#   and per peer one profiled step (table, chrome trace, breakdown: host-bound time vs attention
#   vs matmuls vs the LM head's labelled range), all under $OUT.
#
#   OUT=/some/dir bash bench/gpu_round2.sh              # the GPU round
#   TINY=1 OUT=/tmp/r2 bash bench/gpu_round2.sh         # CPU check of the script (tiny presets)
#
# Without a package index on the device: carry `.whl/` (trl, datasets and their pure-Python
# dependencies, see bench/README.md) and they are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import trl" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if [[ -n "${TINY:-}" ]]; then
    DEVICE=cpu
    PRESETS=(tiny tiny_prompt_heavy)
    STEPS=(2 2)
    WARMUP=(1 1)
    TIMEOUTS=(240 240)   # per peer; a loaded 2-CPU machine
    BUDGET_S=1500
else
    DEVICE=cuda
    PRESETS=(cuda cuda_1p5b)
    STEPS=(8 6)
    WARMUP=(2 2)
    # per peer, subprocess start and model build included: 6 peers at most 540 s together
    TIMEOUTS=(80 100)
    BUDGET_S=300          # do not start the second preset after this many seconds
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

"$PY" - <<'EOF' > "$OUT/versions.txt" 2>&1 || true
import platform, torch, transformers
print(platform.platform(), "torch", torch.__version__, "transformers", transformers.__version__)
try:
    import trl; print("trl", trl.__version__)
except ImportError as error:
    print("no trl:", error)
EOF

for i in "${!PRESETS[@]}"; do
    preset=${PRESETS[$i]}
    if (( SECONDS > BUDGET_S )); then
        echo "skipping $preset: ${SECONDS}s spent (budget ${BUDGET_S}s)" | tee -a "$OUT/skipped.txt"
        continue
    fi
    echo "== $preset ($(date +%T), ${SECONDS}s in)"
    "$PY" bench/engine_vs_trl.py --device "$DEVICE" --preset "$preset" \
        --peers trl ours --prefix-sharing \
        --steps "${STEPS[$i]}" --warmup "${WARMUP[$i]}" --timeout "${TIMEOUTS[$i]}" \
        --json "$OUT/$preset.json" --profile "$OUT/profile_$preset" 2>&1 | tee "$OUT/$preset.log"
done

# One summary over both presets: the rows bench/README.md tabulates, and the breakdowns.
"$PY" - "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "bench")
import torch
from engine_vs_trl import PeerResult, Preset, summarise

out, device = Path(sys.argv[1]), torch.device(sys.argv[2])
summary = {}
for path in sorted(out.glob("*.json")):
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or "preset" not in raw:
        continue
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["preset"].items()}
    preset = Preset(**fields)
    peers = {}
    for peer, result in raw.items():
        if peer in ("preset", "machine"):
            continue
        if not isinstance(result, dict):
            peers[peer] = {"error": str(result)[:500]}
            continue
        row = summarise(PeerResult(**result), preset, device)
        breakdown = out / f"profile_{path.stem}" / f"profile_{peer.replace('+', '-')}.breakdown.json"
        peers[peer] = {
            "layout": result["layout"],
            "tokens_per_s": row.tokens_per_s,
            "step_ms": row.step_ms,
            "peak_gib": result["peak_bytes"] / 2**30,
            "mfu": row.mfu,
            "mfu_useful": row.mfu_useful,
            "first_step_logps_chosen": result["first_step_logps_chosen"],
            "profile": json.loads(breakdown.read_text()) if breakdown.exists() else None,
        }
    reference = peers.get("trl", {})
    for values in peers.values():
        if "tokens_per_s" in values and "tokens_per_s" in reference:
            values["tokens_per_s_vs_trl"] = values["tokens_per_s"] / reference["tokens_per_s"]
            values["memory_vs_trl"] = values["peak_gib"] / reference["peak_gib"]
    summary[path.stem] = {"machine": raw.get("machine"), "peers": peers}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for name, entry in summary.items():
    for peer, values in entry["peers"].items():
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()
                 if k not in ("profile",)}
        print(name, peer, shown)
EOF
# chrome traces of a 1.5B step run to tens of MB: compressed, so that they travel back
gzip -f "$OUT"/profile_*/*.trace.json 2>/dev/null || true
echo "done in ${SECONDS}s; files in $OUT"
