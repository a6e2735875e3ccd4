#!/usr/bin/env bash
# make mutate: mutmut over the modules that encode the papers' rules ([tool.mutmut] in
# pyproject.toml), then a verdict: every mutant that is not killed must be listed as equivalent
# in docs/testing.md, or this fails. Not part of `make test` (docs/testing.md gives the time).
#   bash scripts/mutate.sh              fresh run of every mutant (mutants/ is rebuilt)
#   bash scripts/mutate.sh NAME...      re-run only these mutants (globs allowed) in mutants/
set -uo pipefail
cd "$(dirname "$0")/.."
MUTMUT=.venv/bin/mutmut
DOC=docs/testing.md
LOG=.cache/mutmut-run.log
[ -x "$MUTMUT" ] || { echo "mutate: $MUTMUT not found; run 'make setup' first" >&2; exit 1; }
mkdir -p .cache

# A fresh run: mutmut keeps earlier verdicts in mutants/, which would hide a change in the tests.
[ "$#" -eq 0 ] && rm -rf mutants
# Tiny tensors: one thread per worker, one worker per core (nproc itself obeys OMP_NUM_THREADS).
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
echo "mutate: mutmut run on $cores cores, log in $LOG"
"$MUTMUT" run --max-children "$cores" "$@" >"$LOG" 2>&1
rc=$?
secs=$(($(date +%s) - start))
# The last progress line holds the totals (the log is a spinner rewritten with \r).
tr '\r' '\n' <"$LOG" | grep -E '^. [0-9]+/[0-9]+ ' | tail -n 1
echo "mutate: mutmut took ${secs}s (exit code $rc)"
[ "$rc" -eq 0 ] || { tail -n 30 "$LOG" >&2; exit 1; }
if [ "$#" -gt 0 ]; then
  # Named mutants only: their verdicts (the others keep, or lose, their earlier ones).
  tr '\r' '\n' <"$LOG" | sed -n '/^Mutant results/,$p'
  exit 0
fi

# Verdict. "timeout" counts as detected (a mutant that loops forever); anything else that is
# not "killed" (survived, no tests, suspicious, not checked, ...) must be documented.
results=$("$MUTMUT" results 2>/dev/null | sed 's/^ *//' | grep -v ': timeout$')
documented=$(grep -oE '^\| `rwdet\.[^`]+`' "$DOC" | tr -d '|` ' | sort -u)
undocumented=()
while IFS= read -r line; do
  [ -n "$line" ] || continue
  name=${line%%: *}
  grep -qxF "$name" <<<"$documented" || undocumented+=("$line")
done <<<"$results"
survivors=$(grep -c . <<<"$results")
echo "mutate: $survivors mutant(s) not killed; $((survivors - ${#undocumented[@]})) listed as equivalent in $DOC"
stale=$(comm -23 <(echo "$documented") <(sed 's/: .*//' <<<"$results" | sort -u))
[ -z "$stale" ] || echo "mutate: note: killed now, remove from $DOC: $stale"
if [ "${#undocumented[@]}" -gt 0 ]; then
  echo "mutate: FAILED: ${#undocumented[@]} surviving mutant(s) not in $DOC (kill each with a test" \
    "in tests/test_rules_mutants.py, or list it there as equivalent with the reason):" >&2
  for line in "${undocumented[@]}"; do
    echo "  $line" >&2
    "$MUTMUT" show "${line%%: *}" 2>/dev/null | grep -E '^[-+][^-+]' | sed 's/^/      /' >&2
  done
  exit 1
fi
echo "mutate: OK"
