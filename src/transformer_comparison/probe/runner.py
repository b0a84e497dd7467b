"""Run a probe sweep: plan every run (validated before anything is written), skip the runs
DIR/mqar.csv already holds, train the rest (in a pool of single-threaded worker processes when
several cores are available), rewrite the table after every finished run, then draw the plots.

    from transformer_comparison.probe import ProbeSettings, run_probe
    csv_path = run_probe(ProbeSettings(attention_types=("dot_product", "linear")), Path("results/mqar"))

DIR/probe.json records the settings that make rows comparable (task, budget, model config); a
directory holding a different probe is refused, while adding values to the grid lists and
re-running only trains the new runs.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import transformer_comparison.attention  # noqa: F401  (registers the mechanisms)
from transformer_comparison.artifacts.io import write_text_atomic
from transformer_comparison.attention.registry import kernel_class, registered_names
from transformer_comparison.config import Config, validate_config
from transformer_comparison.errors import UserError
from transformer_comparison.position import position_names
from transformer_comparison.probe import datasets, results
from transformer_comparison.probe.mqar import (
    Examples,
    MQARTask,
    fraction_within,
    generate,
)
from transformer_comparison.probe.results import ProbeRow
from transformer_comparison.probe.settings import (
    ProbeSettings,
    base_config,
    check_settings,
    fingerprint_hash,
    run_config,
    window_of,
)
from transformer_comparison.probe.trainer import resolve_device, train_and_score

FORMAT_VERSION = 1
SETTINGS_NAME = "probe.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything one worker needs to train and score one run."""

    attention_type: str
    position_embedding: str
    seq_len: int
    num_kv_pairs: int
    d_model: int
    learning_rate: float
    seed: int
    test_seq_lens: tuple[int, ...]  # the training length first
    config_data: dict | None  # the run's resolved config as a plain dict (None when refused): workers rebuild it
    settings: ProbeSettings
    window: int | None  # the mechanism's window option, if it has one
    num_layers: int
    num_heads: int
    refused: str | None = None  # why the mechanism refuses the encoding

    @property
    def key(self) -> tuple:
        """The run's identity, as ProbeRow.run_key."""
        return (self.attention_type, self.position_embedding, self.seq_len, self.num_kv_pairs, self.d_model,
                float(f"{self.learning_rate:.12g}"), self.seed)

    @property
    def config(self) -> Config:
        """The run's config (the dict validated again: pydantic's registry-derived classes do not pickle)."""
        if self.config_data is None:
            raise ValueError(f"{self.describe()} is refused: {self.refused}")
        return validate_config(self.config_data)

    def describe(self) -> str:
        return (f"{self.attention_type}+{self.position_embedding} L={self.seq_len} D={self.num_kv_pairs} "
                f"d={self.d_model} lr={self.learning_rate:g} seed={self.seed}")


# ----------------------------------------------------------------------------------------------
# data


def data_rng(seed: int, seq_len: int, num_kv_pairs: int, vocab_size: int, split: int) -> np.random.Generator:
    """The generator of one split's examples: shared by every mechanism, encoding, width and lr."""
    return np.random.default_rng(np.random.SeedSequence([seed, seq_len, num_kv_pairs, vocab_size, split]))


def generated_examples(settings: ProbeSettings, seq_len: int, num_kv_pairs: int, seed: int,
                       test_seq_lens: tuple[int, ...]) -> tuple[Examples, dict[int, Examples]]:
    """(train, {test length: test}) of the generated task; split 0 is train, 1 + i the i-th test length."""
    def task(length: int) -> MQARTask:
        return MQARTask(vocab, length, num_kv_pairs, settings.alpha, settings.random_non_queries)

    vocab = settings.generated_vocab
    train = generate(task(seq_len), settings.num_train, data_rng(seed, seq_len, num_kv_pairs, vocab, 0))
    tests = {length: generate(task(length), settings.num_test, data_rng(seed, length, num_kv_pairs, vocab, 1))
             for length in test_seq_lens}
    return train, tests


def vocab_for(settings: ProbeSettings, *splits: Examples) -> int:
    """The model's vocabulary: the generator's, or with --data the data's (max id + 1) unless
    --vocab_size gives a larger one."""
    if settings.data_dir is None:
        return settings.generated_vocab
    needed = datasets.vocab_needed(*splits)
    if settings.vocab_size is not None and settings.vocab_size < needed:
        raise UserError(f"--vocab_size {settings.vocab_size} is smaller than the data's largest token id + 1 ({needed})")
    return settings.vocab_size or needed


def first_seed(settings: ProbeSettings) -> int:
    """The first training seed: the config's training.seed (later seeds add 1, 2, ...)."""
    return base_config(settings).training.seed


def examples_for(spec: RunSpec) -> tuple[Examples, dict[int, Examples]]:
    settings = spec.settings
    if settings.data_dir is not None:
        train, test = datasets.read_examples(settings.data_dir)
        return train, {test.seq_len: test}
    return generated_examples(settings, spec.seq_len, spec.num_kv_pairs, spec.seed, spec.test_seq_lens)


# ----------------------------------------------------------------------------------------------
# one run (in a worker process)


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per run: several runs at once beat threads contending


def execute(spec: RunSpec) -> list[ProbeRow]:
    """Train and score one run; its rows (one per test length). Never raises: a failure is a row."""
    started = time.perf_counter()
    if spec.refused is not None:
        return [make_row(spec, length, status="refused", note=spec.refused) for length in spec.test_seq_lens]
    try:
        train, tests = examples_for(spec)
        vocab = vocab_for(spec.settings, train, *tests.values())
        result = train_and_score(spec.config, vocab, spec.learning_rate, spec.seed, spec.settings.budget, train, tests,
                                 mlp=spec.settings.mlp)
    except Exception as error:  # noqa: BLE001  (recorded in the row; the next run of the sweep retries it)
        message = " ".join(f"{type(error).__name__}: {error}".split())
        return [make_row(spec, length, status="failed", note=message, wall_seconds=time.perf_counter() - started)
                for length in spec.test_seq_lens]
    return [
        make_row(spec, length, status=result.status, accuracy=result.accuracy[length],
                 state_bytes=result.state_bytes[length], state_grows=result.state_grows, train_steps=result.train_steps,
                 wall_seconds=result.wall_seconds, num_parameters=result.num_parameters,
                 final_train_loss=result.final_train_loss if math.isfinite(result.final_train_loss) else None,
                 vocab_size=vocab)
        for length in sorted(result.accuracy)
    ]


@functools.lru_cache(maxsize=1024)
def reach(window: int, seq_len: int, num_kv_pairs: int, alpha: float) -> float:
    """fraction_within, computed once per setting."""
    return round(fraction_within(window, seq_len, num_kv_pairs, alpha), 4)


def make_row(spec: RunSpec, test_seq_len: int, *, status: str, accuracy: float | None = None,
             state_bytes: int | None = None, state_grows: bool | None = None, train_steps: int | None = None,
             wall_seconds: float = 0.0,
             num_parameters: int | None = None, final_train_loss: float | None = None, vocab_size: int | None = None,
             note: str | None = None) -> ProbeRow:
    """One row of mqar.csv."""
    settings, window = spec.settings, spec.window
    generated = settings.data_dir is None
    reachable = bool(window) and generated
    stack = spec.num_layers * (window - 1) + 1 if window else None
    return ProbeRow(
        attention_type=spec.attention_type, position_embedding=spec.position_embedding, seq_len=spec.seq_len,
        num_kv_pairs=spec.num_kv_pairs, d_model=spec.d_model, learning_rate=spec.learning_rate, seed=spec.seed,
        test_seq_len=test_seq_len, accuracy=accuracy, state_bytes=state_bytes, state_grows=state_grows,
        train_steps=train_steps, status=status,
        wall_seconds=round(wall_seconds, 2), window=window,
        fraction_within_window=reach(window, test_seq_len, spec.num_kv_pairs, settings.alpha) if reachable else None,
        fraction_within_layers=reach(stack, test_seq_len, spec.num_kv_pairs, settings.alpha) if reachable else None,
        vocab_size=vocab_size or settings.generated_vocab, alpha=settings.alpha if generated else None,
        num_layers=spec.num_layers, num_heads=spec.num_heads, mlp=settings.mlp,
        short_conv=int((spec.config_data or {}).get("model", {}).get("short_conv", 0)),
        num_parameters=num_parameters, final_train_loss=final_train_loss,
        data="generated" if generated else str(settings.data_dir), note=note,
    )


# ----------------------------------------------------------------------------------------------
# the plan


def plan(settings: ProbeSettings) -> list[RunSpec]:
    """Every run of the sweep, validated (UserError, one line) before anything is written."""
    attention_names, encodings = registered_names(), position_names()
    check_settings(settings, attention_names, encodings)
    mechanisms = settings.attention_types or attention_names
    positions = settings.position_embeddings or encodings
    base = base_config(settings)
    if settings.data_dir is not None:
        train, test = datasets.read_examples(settings.data_dir)
        vocab_for(settings, train, test)
        shapes = [(train.seq_len, datasets.labels_per_example(train), (test.seq_len,))]
    else:
        tests = tuple(sorted(set(settings.test_seq_lens)))
        shapes = [(length, pairs, (length, *[t for t in tests if t > length]))
                  for length in sorted(set(settings.seq_lens)) for pairs in sorted(set(settings.kv_pairs))]
    context = max(max(lengths) for _, _, lengths in shapes)
    seeds = [first_seed(settings) + i for i in range(settings.seeds)]
    specs = []
    for seq_len, pairs, lengths in shapes:
        for d_model in sorted(set(settings.d_models)):
            for attention in mechanisms:
                refusals = getattr(kernel_class(attention), "refused_positions", {}) or {}
                window = window_of(base, attention)
                for position in positions:
                    refused = refusals.get(position)
                    cfg = None if refused else run_config(base, attention, position, d_model, context).model_dump(mode="python")
                    for lr in sorted(set(settings.learning_rates)):
                        for seed in seeds:
                            specs.append(RunSpec(attention, position, seq_len, pairs, d_model, lr, seed, lengths, cfg,
                                                 settings, window, base.model.num_layers, base.model.num_heads, refused))
    return specs


def check_directory(out_dir: Path, settings: ProbeSettings) -> None:
    """Refuse a directory that holds a probe with other settings; record ours otherwise."""
    record = {"format_version": FORMAT_VERSION, "hash": fingerprint_hash(settings), "settings": settings.fingerprint()}
    path = out_dir / SETTINGS_NAME
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
        if existing.get("hash") != record["hash"]:
            old, new = existing.get("settings", {}), record["settings"]
            differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(f"{out_dir} holds a probe with other settings ({', '.join(differing) or 'format'} differ); "
                            "use another --out")
        return
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def default_jobs(settings: ProbeSettings, cfg: Config) -> int:
    if settings.jobs is not None:
        return settings.jobs
    if resolve_device(cfg).type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# the sweep


def run_probe(settings: ProbeSettings, out_dir: Path, log=print) -> Path:
    """Run the sweep into out_dir; returns the path of mqar.csv. Re-running skips finished runs."""
    specs = plan(settings)
    check_directory(out_dir, settings)
    csv_path = out_dir / results.CSV_NAME
    table = results.read_rows(csv_path)
    done = results.finished_runs(table, {spec.key: set(spec.test_seq_lens) for spec in specs})
    pending = [spec for spec in specs if spec.key not in done]
    log(f"probe mqar: {len(specs)} runs, {len(specs) - len(pending)} already in {csv_path}, {len(pending)} to train")
    jobs = min(default_jobs(settings, base_config(settings)), max(1, len(pending)))
    failed = 0
    for finished, (spec, rows) in enumerate(_results(pending, jobs), start=1):
        table = results.merge_rows(table, rows)
        results.write_rows(csv_path, table)
        failed += rows[0].status == "failed"
        log(f"[{finished}/{len(pending)}] {spec.describe()}: {_summary(rows)}")
    if not csv_path.exists():
        results.write_rows(csv_path, table)
    from transformer_comparison.probe import (
        plots,  # matplotlib only once there is something to draw
    )

    for path in plots.write_plots(table, out_dir):
        log(f"plot: {path}")
    if failed:
        log(f"probe mqar: {failed} run(s) failed (their note column says why); re-running retries them")
    return csv_path


def _results(pending: list[RunSpec], jobs: int):
    """(spec, rows) of every pending run as it finishes: in this process, or in a pool of `jobs` workers."""
    if jobs <= 1:
        for spec in pending:
            yield spec, execute(spec)
        return
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch or thread state
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
        submitted = {pool.submit(execute, spec): spec for spec in pending}
        try:
            for future in futures.as_completed(submitted):
                yield submitted[future], future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _summary(rows: list[dict]) -> str:
    first = rows[0]
    if first.status in ("refused", "failed"):
        return f"{first.status}: {first.note}"
    scores = ", ".join(f"L={r.test_seq_len}: {r.accuracy:.3f}" for r in rows)
    return f"accuracy {scores} ({first.status} after {first.train_steps} steps, {first.wall_seconds:.0f} s)"
