#!/bin/bash
# Regenerate every study's tables, statistics and figures from its sweep directory, then RESULTS.md.
# usage: docs/results/report_all.sh [RUNS_ROOT]   (default: studies_runs, as in docs/results/commands.log)
# RUNS_ROOT/<study> is the glyphs tier, RUNS_ROOT/synthetic/<study> the synthetic (MLP) tier.
set -e
root=${1:-studies_runs}
cd "$(dirname "$0")/../.."
for tier in glyphs synthetic; do
  base=$root; [ $tier = synthetic ] && base=$root/synthetic
  for dir in "$base"/*/; do
    study=$(basename "$dir"); [ "$study" = synthetic ] && continue
    ls "$dir" | grep -q "seed=" || continue
    python -m bilevel.report "$dir" --out docs/figures/studies/$tier/$study --seeds docs/results/${tier}_$study.seeds.json \
      --markdown docs/results/${tier}_$study.md > /dev/null 2> docs/results/.${tier}_$study.err || true
    echo "$tier/$study"
  done
done
python docs/results/walltime.py "$root" --keep docs/results/walltime.md > docs/results/walltime.md.new
mv docs/results/walltime.md.new docs/results/walltime.md
python docs/results/build_results.py
