#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
/work/main/.venv/bin/python benchmarks/research/taps_init.py --stream fmnist5s --variants ridge3_noT_reset,rand3_reset,ridge3_noT_lr1e-3,ridge3_noT_hlr --out-suffix _b5
