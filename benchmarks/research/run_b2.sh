#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
V=ridge3_bnf,ridge1_bnf,rand3_bnf,lda3_bnf,rand3_refit,ridge3_refit,ridge3_bnf_refit,rand1_refit
for s in digits5 fmnist5; do
  /work/main/.venv/bin/python benchmarks/research/taps_init.py --stream $s --variants $V --out-suffix _b2
done
