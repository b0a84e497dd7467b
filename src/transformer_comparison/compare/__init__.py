"""`tcompare compare`: train the attention-mechanism x positional-encoding grid, then write a report.

    tcompare compare --config configs/config.yaml --preset quick --out results/quick
    tcompare compare --config configs/nanogpt_cpu.yaml --attention_types dot_product,linear,local \
        --position_embeddings rope --sweep training.learning_rate=5e-4,1e-3,2e-3 --seeds 3
    tcompare compare ... --executor ray [--ray_address auto] [--cpus_per_cell 2]

Cells are mechanisms x encodings x swept values x seeds (a mechanism's refused encodings are
skipped, with the reason in the report). Every cell trains with the same resolved config except
attention.type, position.type, training.seed (base seed + 0 .. N-1) and its swept values, into
DIR/runs/<attention>-<position>[-<key=value>...]-seed<S>/ (output in train.log there).
DIR/comparison.json records the grid and a hash of the resolved config; running the same command
again skips completed runs, resumes checkpointed ones and retries failed ones, and an output
directory holding a different comparison is refused. Results (results.csv/json, aggregate.csv) are
rewritten after every finished cell; report.md / report.html at the end (`tcompare report DIR`
rebuilds them).

Modules: plan (the cells, validated before anything is written), sweeps (--sweep axes), accounting
(parameters and training FLOPs, --match params, FLOP budgets), cells (one run, wherever it trains),
executors (local thread pool, Ray tasks), extras (--bench, --extrapolate), command (this command).
"""

from transformer_comparison.compare.command import add_arguments, run

__all__ = ["add_arguments", "run"]
