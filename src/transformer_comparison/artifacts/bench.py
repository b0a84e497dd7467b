"""Rows of the benchmark result files: kernels.csv, kernels_crossover.csv, decode.csv, train_bench.csv.

The column names (and their order) are the ones these files have always had; external scripts read them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KernelRow(_Row):
    mechanism: str
    seq_len: int
    pass_: str = Field(alias="pass")  # "pass" in the file (a Python keyword)
    time_ms: float | None = None
    peak_memory_bytes: int | None = None
    status: str
    gflops_per_second: float | None = None
    peak_rss_delta_bytes: int | None = None
    memory_method: str | None = None
    position_embedding: str | None = None
    batch: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    options: str | None = None
    time_ms_min: float | None = None  # time_ms is the median over the case's rounds (--repeats); these its range
    time_ms_max: float | None = None
    repeats: int | None = None  # rounds the case ran ok in
    time_ratio_to_reference: float | None = None  # median over rounds of time / torch_sdpa's (same length and pass)
    round_times_ms: str | None = None  # each round's time, in round order, space-separated
    ratio_method: str | None = None  # "paired" (alternately with torch_sdpa in one process), "rounds" or "reference"
    round_ratios: str | None = None  # each round's ratio to torch_sdpa (time_ratio_to_reference is their median)

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class CrossoverRow(_Row):
    mechanism: str
    pass_: str = Field(alias="pass")
    metric: str
    crossover_seq_len: str

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class DecodeRow(_Row):
    mechanism: str
    position_embedding: str
    context_length: int
    ms_per_token: float | None = None
    cache_bytes: int | None = None
    status: str
    threads: int | None = None
    batch: int | None = None
    allocated_bytes: int | None = None
    weights: str | None = None
    device: str | None = None
    d_model: int | None = None
    num_heads: int | None = None
    kv_heads: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    train_context_length: int | None = None
    options: str | None = None


class TrainBenchRow(_Row):
    """One run of `tcompare bench train`: the reference or a tcompare cell, one repeat."""

    implementation: str
    attention_type: str | None = None
    position_embedding: str | None = None
    repeat: int
    median_step_ms: float | None = None
    tokens_per_second: float | None = None
    achieved_gflops: float | None = None
    peak_gflops: float | None = None
    fraction_of_peak: float | None = None
    windows: int | None = None
    steps: int | None = None
    threads: int | None = None
    final_train_loss: float | None = None
    keeps_freed_memory: bool | None = None  # whether the run's process kept freed memory (allocator.keep_freed_memory)
    status: str
