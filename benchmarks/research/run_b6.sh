#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
P=/work/main/.venv/bin/python
$P benchmarks/research/taps_init.py --stream fmnist5s --variants ridge3_noT_reset_refit,rand3_reset_refit --out-suffix _b6
$P benchmarks/research/taps_init.py --stream fmnist5 --variants ridge3_noT_reset,rand3_reset --out-suffix _b6
