#!/bin/bash
# The tutorial's screenshots (docs/tutorial.md), taken from a real browser (headless Chromium) on
# TensorBoard served on 127.0.0.1 and on the sweep's report.html.
# usage: docs/figures/tutorial/screenshots.sh SWEEP_DIR
#   SWEEP_DIR: the tutorial's sweep, bilevel-train -m head.policy=random,zero_init,zeroing train.steps=150
#   train.decompose_every=10, after `bilevel-report SWEEP_DIR` (it writes SWEEP_DIR/report/report.html).
set -euo pipefail
sweep=$(realpath "$1")
out=$(cd "$(dirname "$0")" && pwd)
port=${PORT:-6123}
run=$(ls -d "$sweep"/*/tb/head.policy=zeroing | head -1)   # one run: its own TensorBoard folder
tensorboard --logdir "$(dirname "$run")" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 & one=$!
tensorboard --logdir "$sweep" --host 127.0.0.1 --port $((port + 1)) >/dev/null 2>&1 & all=$!
trap 'kill $one $all' EXIT
for p in "$port" $((port + 1)); do  # until both have read every run's events
  until curl -sf "http://127.0.0.1:$p/data/plugin/scalars/tags" | grep -q "terms/share"; do sleep 2; done
done
sleep 10
rm -f "$out"/*.png

shot() {  # shot FILE WIDTH,HEIGHT URL: three tries, the fullest kept (a card drawn late is left blank)
  for try in 1 2 3; do
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$2" \
      --virtual-time-budget=60000 --screenshot="$out/try.png" "$3" 2>/dev/null || true
    [ -f "$out/try.png" ] || continue
    if [ ! -f "$out/$1" ] || [ "$(stat -c %s "$out/try.png")" -gt "$(stat -c %s "$out/$1")" ]; then
      mv "$out/try.png" "$out/$1"
    fi
  done
  rm -f "$out/try.png"
}
one_run="http://127.0.0.1:$port"
sweep_tb="http://127.0.0.1:$((port + 1))"
# TIME SERIES with smoothing off (?smoothing=0), one tag per view: every line is a run, named under the chart
# (forceSVG=true: headless Chromium has no WebGL to draw TensorBoard's default line charts)
shot shares.png 1500,900 "$one_run/?smoothing=0&forceSVG=true&tagFilter=terms%2Fshare#timeseries"
shot accuracy_per_step.png 1500,900 "$one_run/?smoothing=0&forceSVG=true&tagFilter=eval%2Faccuracy_per_step#timeseries"
shot checks_and_norms.png 1500,1000 "$one_run/?smoothing=0&forceSVG=true&tagFilter=checks%2Flog10_error%7Cterms%2Fnorm#timeseries"
shot custom_scalars.png 1500,1500 "$one_run/#custom_scalars&_smoothingWeight=0"
shot images.png 1500,1000 "$one_run/?tagFilter=pairs%2Fweights#timeseries"
# the sweep: the contrastive share of the three policies (runFilter; a colour per policy: runColorGroup=regex:head.policy=(\w+)), HPARAMS
shot sweep_contrastive_share.png 1500,900 \
  "$sweep_tb/?smoothing=0&forceSVG=true&runColorGroup=regex%3Ahead.policy%3D(%5Cw%2B)&runFilter=term%3Dcontrastive&tagFilter=terms%2Fshare#timeseries"
shot hparams.png 1500,700 "$sweep_tb/#hparams"
shot report_html.png 1300,2300 "file://$sweep/report/report.html"
