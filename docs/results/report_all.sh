#!/bin/bash
# Regenerate every study's tables, statistics and figures from its sweep directory, then RESULTS.md.
# usage: docs/results/report_all.sh [-n] [RUNS_ROOT]   (default: studies_runs, as in docs/results/commands.log)
# docs/results/reports.tsv names each report's sweep folder under RUNS_ROOT; a report whose folder is
# "-" (superseded by a rerun) or holds no runs here is left as published, and the script says so.
# -n: print the report commands without running anything.
set -e
dry=; [ "$1" = -n ] && { dry=1; shift; }
root=${1:-studies_runs}
cd "$(dirname "$0")/../.."
failed=0
while IFS=$'\t' read -r report sweep; do
  tier=${report%%_*}; name=${report#*_}; dir=$root/$sweep
  if [ "$sweep" = - ] || ! ls "$dir" 2> /dev/null | grep -q "seed="; then
    echo "$report: kept as published (no runs in ${sweep/#-/its superseded sweep})"; continue
  fi
  cmd=(python -m bilevel.report "$dir" --out "docs/figures/studies/$tier/$name" --seeds "docs/results/$report.seeds.json"
       --markdown "docs/results/$report.md")
  if [ -n "$dry" ]; then echo "${cmd[*]}"; continue; fi
  if "${cmd[@]}" > /dev/null 2> "docs/results/.$report.err"; then echo "$report: from $dir"
  else echo "$report: FAILED (docs/results/.$report.err)"; failed=1; fi
done < <(grep -v '^#' docs/results/reports.tsv)
for dir in "$root"/*/ "$root"/synthetic/*/; do
  sweep=${dir#"$root"/}; sweep=${sweep%/}
  ls "$dir" 2> /dev/null | grep -q "seed=" || continue
  cut -f2 docs/results/reports.tsv | grep -qx "$sweep" || echo "$sweep: has runs but no report in docs/results/reports.tsv"
done
[ -n "$dry" ] && exit 0
python docs/results/walltime.py "$root" --keep docs/results/walltime.md > docs/results/walltime.md.new
mv docs/results/walltime.md.new docs/results/walltime.md
python docs/results/build_results.py
exit $failed
