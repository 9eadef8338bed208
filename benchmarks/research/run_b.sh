#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
V=rand3,ridge3,lda3,rand1,ridge1,lda1,ridge3_noT,ridge3_hlr,ridge3_w0,ridge3_w3,rand3_w3,ridge3_lr1e-3,rand3_lr1e-3,ridge3_lr3e-4,ridge3_hlr0
for s in digits5 fmnist5; do
  /work/main/.venv/bin/python benchmarks/research/taps_init.py --stream $s --variants $V
done
