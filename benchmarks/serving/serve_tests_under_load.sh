#!/usr/bin/env bash
# Issue 33 item 8: the serve tests (not the Ray cluster tests) run N times (default 20) beside two CPU hogs at the
# tests' own priority, one line per run. Run from the repository root with the project's venv:
#   bash benchmarks/serving/serve_tests_under_load.sh 20 | tee benchmarks/serving/results/serve-tests-under-load.txt
set -u
n=${1:-20}
python3 -c 'while 1: pass' & h1=$!
python3 -c 'while 1: pass' & h2=$!
trap 'kill $h1 $h2' EXIT
for i in $(seq 1 "$n"); do
  t0=$(date +%s.%N)
  log=$(mktemp)
  PYTHONPATH=src .venv/bin/python -m pytest -q -p no:cacheprovider tests/serve --ignore=tests/serve/test_ray_serve.py -m "not slow" > "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "run $i rc=$rc seconds=$(python3 -c "print(round($t1-$t0,1))") $(tail -1 "$log")"
  rm -f "$log"
done
