#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
P=/work/main/.venv/bin/python
$P benchmarks/research/extract.py --size 32 --streams fmnist5s
$P benchmarks/research/taps_init.py --stream fmnist5s --variants rand3,ridge3_noT,ridge3,rand3_refit,ridge3_noT_refit,lda3,rand1,ridge1_noT
