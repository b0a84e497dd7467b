"""Run artifacts: the typed models of every result file and the one module that writes and reads them.

`io` holds the atomic writers and the validating readers; each command's files have their models in
a module of this package (run.py: summary.json and metrics.jsonl; comparison.py: comparison.json and
results.csv; bench.py: kernels.csv, decode.csv; evaluation.py: extrapolation.csv). Column and key names
are the ones external scripts already read; a model never renames them.
"""
