"""`tcompare bench decode`: time per generated token and cache (or state) size against context length.

For each mechanism, a model (a run's trained model, or a randomly initialised one of a config: the
cost of a step does not depend on the weights) decodes from caches filled to each context length c:
random tokens are prefilled in chunks of PREFILL_CHUNK (so local and linear stay linear in c), the
held cache bytes are summed over layers, then WARMUP_TOKENS steps run untimed and `--new_tokens`
steps of one token each are timed with perf_counter (CUDA synchronised); ms_per_token is their
median. Contexts are taken in increasing order in one fresh process per mechanism
(`python -m transformer_comparison.bench.decode --case JSON`), each filling the cache further from
where the last stopped; a context that fails, runs out of memory or exceeds `--timeout` seconds is
recorded with its status and the larger ones as skipped, never raised. docs/decoding.md has the
cache of each mechanism and how to read the outputs:

    DIR/decode.csv  decode_latency.png  decode_cache.png
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from transformer_comparison.artifacts.bench import DecodeRow
from transformer_comparison.artifacts.io import write_csv
from transformer_comparison.bench.common import (
    child_exit_status, choose, comma_list, error_status, options_text, positive_ints, resolve_device,
)
from transformer_comparison.errors import UserError
from transformer_comparison.numerics import prepare_process
from transformer_comparison.plots import Panel, loglog_figure, save_png

DEFAULT_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192]
DEFAULT_VOCAB_SIZE = 256  # --config without model.vocab_size: the byte tokenizer's size
PREFILL_CHUNK = 512  # tokens per prefill call while filling a cache
WARMUP_TOKENS = 2  # untimed steps before the timed ones, at each context
RESULT_PREFIX = "TCOMPARE_DECODE_RESULT "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, metavar="DIR",
                        help="a run directory: its config, its trained weights for its own mechanism (others: "
                             "randomly initialised models of the same config)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="a YAML config; randomly initialised models of it")
    parser.add_argument("--mechanisms", type=comma_list, default=None,
                        help="comma-separated mechanisms (default: every registered one)")
    parser.add_argument("--position_embedding", default=None,
                        help="a registered encoding (default: the run's or config's position.type)")
    parser.add_argument("--contexts", type=positive_ints, default=DEFAULT_CONTEXTS,
                        help="comma-separated context lengths, tokens already in the cache "
                             "(default: 128,256,512,1024,2048,4096,8192)")
    parser.add_argument("--new_tokens", type=int, default=16, help="timed one-token steps per context (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's default, what tcompare generate would use)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per context (filling and timing) before the mechanism is stopped (default: %(default)s)")
    parser.add_argument("--out", default="results/bench", help="output directory (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (with --config)")


# --------------------------------------------------------------------------- validation (parent)


def base_config(args: argparse.Namespace) -> tuple[Any, int, str | None]:
    """(config, vocab size, run directory or None) from --run or --config and its overrides."""
    from transformer_comparison.config import load_config

    if (args.run is None) == (args.config is None):
        raise UserError("give exactly one of --run DIR and --config FILE")
    if args.run is None:
        cfg = load_config(args.config, args.overrides)
        return cfg, cfg.model.vocab_size or DEFAULT_VOCAB_SIZE, None
    if args.overrides:
        raise UserError("section.key=value overrides go with --config; a --run's model is fixed by its checkpoint")
    from transformer_comparison.generate import load_run

    model, tokenizer, cfg = load_run(args.run)  # checks that the run is complete and its checkpoint loads
    vocab_size = model.config.vocab_size
    del model, tokenizer
    return cfg, vocab_size, str(args.run)


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate the command line and return one JSON-able case per mechanism (all its contexts)."""
    from transformer_comparison.attention.registry import kernel_class, registered_names
    from transformer_comparison.config import kernel_options_for, kv_heads_for, with_overrides
    from transformer_comparison.position import position_names

    contexts = args.contexts
    for name in ("new_tokens", "batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    mechanisms = choose(args.mechanisms or list(registered_names()), registered_names(), "--mechanisms")
    device = resolve_device(args.device)
    cfg, vocab_size, run_dir = base_config(args)
    position = args.position_embedding or cfg.position.type
    choose([position], position_names(), "--position_embedding")
    threads = args.threads or torch.get_num_threads()

    cases = []
    for mechanism in mechanisms:
        if position in kernel_class(mechanism).refused_positions:
            print(f"  {mechanism} skipped: {kernel_class(mechanism).refused_positions[position]}", file=sys.stderr)
            continue
        cfg_m = with_overrides(cfg, [f"attention.type={mechanism}", f"position.type={position}"])
        trained = run_dir is not None and (mechanism, position) == (cfg.attention.type, cfg.position.type)
        cases.append({
            "mechanism": mechanism, "position_embedding": position, "config": cfg_m.model_dump(mode="json"),
            "vocab_size": vocab_size, "run": run_dir if trained else None, "contexts": contexts,
            "new_tokens": args.new_tokens, "batch": args.batch, "threads": threads, "device": device,
            "kv_heads": kv_heads_for(cfg_m), "options": kernel_options_for(cfg_m),
        })
    return cases


# --------------------------------------------------------------------------- one mechanism (child process)


def load_model(case: dict[str, Any]) -> Any:
    """The case's model in eval mode on its device: trained weights with a run, else seeded random ones."""
    from transformer_comparison.checkpoint import load_checkpoint
    from transformer_comparison.config import validate_config
    from transformer_comparison.model import build_model

    torch.manual_seed(0)
    model = build_model(validate_config(case["config"]), case["vocab_size"])
    if case["run"] is not None:
        model.load_state_dict(load_checkpoint(Path(case["run"]) / "checkpoints" / "latest.pt")["model"])
    return model.to(case["device"]).eval()


class Decoder:
    """A model and its caches, filled with random tokens and stepped one token at a time."""

    def __init__(self, model: Any, batch: int, device: torch.device) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.generator = torch.Generator().manual_seed(0)
        self.caches = model.new_caches()

    def tokens(self, n: int) -> torch.Tensor:
        ids = torch.randint(self.model.config.vocab_size, (self.batch, n), generator=self.generator)
        return ids.to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fill(self, context: int) -> None:
        """Bring the caches to exactly `context` tokens (from scratch if they already hold more)."""
        if self.caches[0].position > context:
            self.caches = self.model.new_caches()
        while self.caches[0].position < context:
            self.model(self.tokens(min(PREFILL_CHUNK, context - self.caches[0].position)), caches=self.caches)
        self.sync()

    def step_seconds(self) -> float:
        token = self.tokens(1)
        self.sync()
        start = time.perf_counter()
        self.model(token, caches=self.caches)
        self.sync()
        return time.perf_counter() - start


def measure(case: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One result per context, in increasing order; stops after the first failure."""
    from transformer_comparison.bench.memory import available_memory_bytes, limit_address_space

    torch.set_num_threads(case["threads"])
    prepare_process()
    device = torch.device(case["device"])
    with torch.inference_mode():
        model = load_model(case)
        warm = Decoder(model, case["batch"], device)  # thread pools, allocator, first-call overheads
        warm.fill(min(case["contexts"][0], 64))
        for _ in range(WARMUP_TOKENS):
            warm.step_seconds()
        del warm
        if device.type == "cpu":
            available = available_memory_bytes()
            if available:
                limit_address_space(int(available * 0.9))
        decoder = Decoder(model, case["batch"], device)
        for context in case["contexts"]:
            try:
                decoder.fill(context)
                held = sum(cache.nbytes for cache in decoder.caches)
                allocated = sum(cache.allocated_bytes for cache in decoder.caches)
                times = [decoder.step_seconds() for _ in range(WARMUP_TOKENS + case["new_tokens"])]
            except Exception as error:  # recorded, never raised
                yield {"context_length": context, "status": error_status(error)}
                return
            yield {"context_length": context, "status": "ok", "ms_per_token": statistics.median(times[WARMUP_TOKENS:]) * 1e3,
                   "cache_bytes": held, "allocated_bytes": allocated}


def case_main(argv: list[str] | None = None) -> int:
    """`python -m transformer_comparison.bench.decode --case JSON`: print one result line per context."""
    parser = argparse.ArgumentParser(description="decode benchmark of one mechanism (used by tcompare bench decode)")
    parser.add_argument("--case", required=True, help="the case as JSON")
    case = json.loads(parser.parse_args(argv).case)
    try:
        for result in measure(case):
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    except Exception as error:  # e.g. the model could not be built: reported for the first context
        print(RESULT_PREFIX + json.dumps({"status": error_status(error)}), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def run_mechanism(case: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run one mechanism's child; one result per context, the contexts after a failure marked skipped."""
    command = [sys.executable, "-m", "transformer_comparison.bench.decode", "--case", json.dumps(case)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results: queue.Queue[dict[str, Any] | None] = queue.Queue()
    stderr_lines: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                results.put(json.loads(line[len(RESULT_PREFIX):]))
        results.put(None)

    def read_stderr() -> None:
        assert proc.stderr is not None
        stderr_lines.extend(proc.stderr)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    out: list[dict[str, Any]] = []
    try:
        for context in case["contexts"]:
            try:
                result = results.get(timeout=timeout)
            except queue.Empty:
                out.append({"context_length": context, "status": "timeout"})
                break
            if result is None:
                for reader in readers:
                    reader.join(timeout=5)
                out.append({"context_length": context, "status": child_exit_status(proc.wait(), "".join(stderr_lines))})
                break
            out.append({**result, "context_length": context})
            if result["status"] != "ok":
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if len(out) < len(case["contexts"]):
        reason = f"skipped ({out[-1]['status']} at context {out[-1]['context_length']})"
        out += [{"context_length": c, "status": reason} for c in case["contexts"][len(out):]]
    return out


def make_row(case: dict[str, Any], result: dict[str, Any]) -> DecodeRow:
    model = case["config"]["model"]
    return DecodeRow(
        mechanism=case["mechanism"], position_embedding=case["position_embedding"],
        context_length=result["context_length"], ms_per_token=result.get("ms_per_token"),
        cache_bytes=result.get("cache_bytes"), status=result["status"],
        threads=case["threads"], batch=case["batch"], allocated_bytes=result.get("allocated_bytes"),
        weights="trained" if case["run"] else "random", device=case["device"],
        d_model=model["d_model"], num_heads=model["num_heads"], kv_heads=case["kv_heads"],
        num_layers=model["num_layers"], vocab_size=case["vocab_size"],
        train_context_length=model["context_length"], options=options_text(case["options"]),
    )


def print_table(rows: list[DecodeRow]) -> None:
    import pandas as pd

    print(pd.DataFrame([{
        "mechanism": r.mechanism, "position": r.position_embedding, "context": r.context_length,
        "ms/token": "-" if r.ms_per_token is None else f"{r.ms_per_token:.3f}",
        "cache_KiB": "-" if r.cache_bytes is None else f"{r.cache_bytes / 1024:.1f}", "status": r.status,
    } for r in rows]).to_string(index=False))


def checks(rows: list[DecodeRow]) -> list[str]:
    """How each mechanism's latency and memory grow with the context, as measured (reported, not
    asserted): latency change from the first context >= 256 to the last, and whether the cache is
    constant or by how much it grows; the same for every mechanism, whatever it is."""
    notes = []
    for mechanism in dict.fromkeys(r.mechanism for r in rows):
        ok = sorted((r.context_length, r) for r in rows if r.mechanism == mechanism and r.status == "ok")
        timed = [(c, r.ms_per_token) for c, r in ok if c >= 256 and r.ms_per_token]
        cached = [(c, r.cache_bytes) for c, r in ok if r.cache_bytes is not None]
        parts = []
        if len(timed) >= 2:
            (c0, t0), (c1, t1) = timed[0], timed[-1]
            parts.append(f"ms/token {t0:.3f} at {c0} -> {t1:.3f} at {c1} ({t1 / t0 - 1:+.0%})")
        if len(cached) >= 2:
            constant_from = next((c for c, b in cached if all(b2 == b for c2, b2 in cached if c2 >= c)), None)
            (c0, b0), (c1, b1) = cached[0], cached[-1]
            parts.append(f"cache constant at {b1:,} bytes from context {constant_from}" if constant_from is not None
                         and constant_from < c1 else f"cache x{b1 / b0:.3g} from {c0} to {c1}")
        if parts:
            notes.append(f"{mechanism}: " + "; ".join(parts))
    return notes


def plot(rows: list[DecodeRow], out_dir: Path) -> None:
    records = [r.model_dump() for r in rows if r.status == "ok"]
    for panel, title, filename in (
        (Panel("ms_per_token", "median time per token (ms)"), "decoding one token", "decode_latency.png"),
        (Panel("cache_bytes", "cache / state (MiB, all layers)", 2**20), "decoding memory", "decode_cache.png"),
    ):
        fig = loglog_figure(records, "context_length", [panel], line="mechanism", title=title,
                            xlabel="context length (tokens in the cache)")
        if fig is not None:
            save_png(fig, out_dir / filename, dpi=120)


def run(args: argparse.Namespace) -> int:
    cases = build_cases(args)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    if not cases:
        raise UserError("no mechanism to benchmark: every one asked for refuses this position embedding")
    first = cases[0]
    model = first["config"]["model"]
    print(f"tcompare bench decode: {len(cases)} mechanisms x {len(first['contexts'])} contexts on {first['device']} "
          f"({first['threads']} threads), {first['position_embedding']}, batch {first['batch']}, d_model {model['d_model']}, "
          f"{model['num_layers']} layers, {model['num_heads']} heads, {'trained run' if args.run else 'random weights'}",
          file=sys.stderr)
    rows: list[DecodeRow] = []
    for case in cases:
        print(f"  {case['mechanism']} ...", file=sys.stderr, flush=True)
        for result in run_mechanism(case, args.timeout):
            rows.append(make_row(case, result))
        write_csv(out_dir / "decode.csv", rows, DecodeRow)
    print_table(rows)
    plot(rows, out_dir)
    notes = checks(rows)
    if notes:
        print()
        for note in notes:
            print(note)
    print(f"\nwrote {out_dir / 'decode.csv'}, decode_latency.png, decode_cache.png")
    return 0


if __name__ == "__main__":
    sys.exit(case_main())
