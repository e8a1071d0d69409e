#!/bin/bash
# The store commands timed with two psi-server binaries (e.g. before and
# after a change to the store), at 10^6: init, serve load, three updates,
# compact, rotate-key, publish. Usage: store-checks.sh OLD_BIN NEW_BIN WORKDIR
# (issue #26's figures in BENCHMARKS.md).
set -u
OLD=$1 NEW=$2 W=$3
mkdir -p $W
[ -f $W/people.csv ] || $NEW generate --count 1000000 --seed 7 --out $W/people.csv 2>/dev/null
for s in 1 2 3; do
  [ -f $W/add$s.csv ] || $NEW generate --count 1000 --seed $((100+s)) --out $W/add$s.csv 2>/dev/null
  [ -f $W/rm$s.csv ] || { echo name,id; sed -n "$((2+(s-1)*1000)),$((1+s*1000))p" $W/people.csv; } > $W/rm$s.csv
done
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1 || echo "FAILED: $*" >&2; echo "$(date +%s.%N) - $s" | bc; }
load_ms() { # three starts of serve, load_ms from the log
  for i in 1 2 3; do
    RUST_LOG=info timeout 120 $1 serve --data-dir $2 --listen 127.0.0.1:0 2>$W/serve.log >/dev/null &
    local pid=$!
    for k in $(seq 600); do grep -q "registry loaded" $W/serve.log 2>/dev/null && break; sleep 0.1; done
    grep -o 'load_ms=[0-9]*' $W/serve.log | head -1 | cut -d= -f2
    kill $pid; wait $pid 2>/dev/null
  done | paste -sd' '
}
for which in old new; do
  B=$OLD; [ $which = new ] && B=$NEW
  D=$W/data-$which; rm -rf $D
  echo "== $which ($B)"
  echo "init 10^6: $(t $B init --no-progress --registry $W/people.csv --data-dir $D) s"
  echo "serve load_ms x3: $(load_ms $B $D)"
  for s in 1 2 3; do
    echo "update 1000+1000 #$s: $(t $B update --no-progress --add $W/add$s.csv --remove $W/rm$s.csv --data-dir $D) s"
  done
  echo "serve load_ms x3 (3 updates in the log): $(load_ms $B $D)"
  echo "compact: $(t $B compact --data-dir $D) s"
  echo "rotate-key: $(t $B rotate-key --no-progress --grace-period 0s --data-dir $D) s"
  echo "publish: $(t $B publish --data-dir $D --to $W/serving-$which) s"
  rm -rf $W/serving-$which
done
