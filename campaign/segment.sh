#!/usr/bin/env bash
# Continue the long QM9 training run (issue 14) for MINUTES of training, on THREADS CPU threads (default 2),
# and append one line per segment to campaign/segments.csv: when, where, steps and throughput.
#
#   bash campaign/segment.sh 120 2 &      # at the start of a session, in the background
#
# The run stops cleanly at the time limit (last.pt saved); commit campaign/ afterwards. Extra arguments go
# to `se3t train` (e.g. --device cuda --cuda-graphs on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: campaign/segment.sh MINUTES [THREADS] [se3t train options...]}
threads=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
run=campaign/qm9-multitask
position() {  # step, epoch and training seconds so far, from last.pt
  python - "$run/last.pt" <<'PY'
import sys, torch
r = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["resume"]
print(r["step"], r["epoch"], round(r["elapsed"], 1))
PY
}
read -r step0 epoch0 elapsed0 < <(position)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
status=0  # a segment interrupted (Ctrl-C, SIGTERM) after some steps saved last.pt: record it, pass its status on
OMP_NUM_THREADS=$threads se3t train --out "$run" --resume --time-limit "$minutes" "$@" || status=$?
read -r step1 epoch1 elapsed1 < <(position)
if [ "$status" -ne 0 ] && [ "$step1" = "$step0" ]; then exit "$status"; fi  # it never started training
batch=$(python -c "import json; print(json.load(open('$run/config.json'))['options']['batch_size'])")
rate=$(python -c "print(round(($step1 - $step0) * $batch / max($elapsed1 - $elapsed0, 1e-9), 1))")
[ -f campaign/segments.csv ] || echo "started_utc,cpu,threads,extra_options,step_from,step_to,epoch_from,epoch_to,train_s,mol_per_s" > campaign/segments.csv
cpu=$(python -c "import platform; print(platform.machine())")
echo "$started,$cpu x$(nproc),$threads,\"$*\",$step0,$step1,$epoch0,$epoch1,$(python -c "print(round($elapsed1 - $elapsed0, 1))"),$rate" >> campaign/segments.csv
echo "segment done: steps $step0 -> $step1, epochs $epoch0 -> $epoch1, $rate mol/s"
exit "$status"
