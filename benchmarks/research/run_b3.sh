#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
/work/main/.venv/bin/python benchmarks/research/taps_init.py --stream fmnist5 --variants rand3,ridge3_noT,ridge3,rand1,ridge1_noT,rand3_refit,ridge3_noT_refit,lda3,ridge3_noT_lr1e-3,rand3_lr1e-3
/work/main/.venv/bin/python benchmarks/research/taps_init.py --stream digits5 --variants ridge1_noT,rand3_refit,ridge3_noT_refit,ridge3_noT_lr1e-3,rand3_lr1e-3
