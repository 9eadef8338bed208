#!/bin/sh
export PYTHONPATH=/work/wt-route
cd /work/wt-route
P=/work/main/.venv/bin/python
$P benchmarks/research/exp_heads.py --stream fmnist5 --size 64 --patch none --sizes 2000,4000
$P benchmarks/research/exp_heads.py --stream digits5 --size 64 --patch none --sizes 2000
$P benchmarks/research/exp_heads.py --stream fmnist5 --size 32 --tag _nocrop --sizes 2000
$P benchmarks/research/exp_heads.py --stream digits5 --size 32 --tag _nocrop --sizes 2000
$P benchmarks/research/exp_heads.py --stream multi --size 64 --patch none --sizes 2000
$P benchmarks/research/exp_heads.py --stream multi --size 32 --tag _nocrop --sizes 2000
