#!/usr/bin/env bash
# Show that two commits compute the same results: run the quick main job's compression cells
# (`headalloc reproduce --quick --only compress_smollm2`) and the default run (`headalloc compress --budget 0.5`)
# on each commit, in its own git worktree, at one thread (runs at different thread counts differ in rounding),
# then compare every plan and every measured number (scripts/compare_runs.py; timings ignored).
#   scripts/compare_commits.sh BEFORE AFTER [OUT]       e.g. scripts/compare_commits.sh HEAD~1 HEAD
#   --quick-only                                          skip the default run (about 40 min a commit at one thread)
# Uses this checkout's .venv (./scripts/setup.sh first). OUT (default results/compare-BEFORE-AFTER) must not exist.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK_ONLY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --quick-only) QUICK_ONLY=1 ;;
    -*) echo "compare_commits: unknown option '$a' (known: --quick-only)" >&2; exit 2 ;;
    *) ARGS+=("$a") ;;
  esac
done
[ "${#ARGS[@]}" -ge 2 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
BEFORE=$(git rev-parse --short "${ARGS[0]}") || { echo "compare_commits: no commit '${ARGS[0]}'" >&2; exit 2; }
AFTER=$(git rev-parse --short "${ARGS[1]}") || { echo "compare_commits: no commit '${ARGS[1]}'" >&2; exit 2; }
OUT=${ARGS[2]:-results/compare-$BEFORE-$AFTER}
[ -x .venv/bin/python ] || { echo "compare_commits: run ./scripts/setup.sh first" >&2; exit 2; }
[ ! -e "$OUT" ] || { echo "compare_commits: $OUT exists; give another folder" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=$(pwd)/.venv/bin/python
# the worktrees this script adds are removed however it ends (a kill included); results and logs stay in OUT
trees=()
cleanup() { for t in "${trees[@]}"; do git worktree remove --force "$t" 2>/dev/null || true; done; git worktree prune; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
RUN='import sys, torch; torch.set_num_threads(1); from headalloc.cli import main; raise SystemExit(main(sys.argv[1:]))'
for c in "$BEFORE" "$AFTER"; do
  tree="$OUT/tree-$c"
  git worktree add --detach "$tree" "$c" >/dev/null
  trees+=("$tree")
  for job in quick default; do
    [ "$job" = default ] && [ "$QUICK_ONLY" = 1 ] && continue
    start=$(date +%s)
    if [ "$job" = quick ]; then
      args=(reproduce --quick --only compress_smollm2 --out "$OUT/$c-quick")
    else
      args=(compress --budget 0.5 --out "$OUT/$c-default")
    fi
    # the commit's own source first on the path; ledger rows (commits that write them) kept beside the results
    (cd "$tree" && PYTHONPATH="$tree/src" OMP_NUM_THREADS=1 HEADALLOC_LEDGER="$OUT/ledger-$c.jsonl" \
      "$PY" -c "$RUN" "${args[@]}" >"$OUT/$c-$job.log" 2>&1) || {
      echo "compare_commits: $job on $c failed: $OUT/$c-$job.log" >&2; exit 1; }
    echo "$c $job: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
  done
done
rc=0
"$PY" scripts/compare_runs.py "$OUT/$BEFORE-quick" "$OUT/$AFTER-quick" || rc=1
if [ "$QUICK_ONLY" = 0 ]; then
  "$PY" scripts/compare_runs.py "$OUT/$BEFORE-default" "$OUT/$AFTER-default" || rc=1
fi
exit $rc
