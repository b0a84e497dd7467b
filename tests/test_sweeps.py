"""The comparison plan without training: sweeps over any key, the registry-derived grid, refused cells,
parameter and FLOP accounting, --match params and FLOP budgets, and bad input as one-line errors."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import yaml

from transformer_comparison.attention.registry import kernel_class, registered_names
from transformer_comparison.cli import build_parser, main
from transformer_comparison.compare import accounting
from transformer_comparison.compare.plan import Plan, make_plan
from transformer_comparison.config import load_config, with_overrides
from transformer_comparison.model import build_model
from transformer_comparison.position import position_names


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"d_model": 32, "num_heads": 4, "num_layers": 2, "context_length": 16},
        "training": {"batch_size": 4, "max_steps": 10, "seed": 7, "device": "cpu", "min_learning_rate": 1e-5},
        "data": {"dataset": str(root / "unused.txt")}, "logging": {"wandb": "disabled"},
    }))
    return path


def plan_for(config: Path, *argv: str) -> Plan:
    return make_plan(build_parser().parse_args(["compare", "--config", str(config), *argv]))


def test_default_grid_grows_with_the_registries(config):
    plan = plan_for(config, "--seeds", "2")
    assert plan.attention_types == list(registered_names()) and plan.position_embeddings == list(position_names())
    assert len(plan.cells) == len(registered_names()) * len(position_names()) * 2
    assert [c.seed for c in plan.cells[:2]] == [7, 8] and plan.cells[0].name == f"{registered_names()[0]}-{position_names()[0]}-seed7"


def test_sweep_axes_make_the_product(config):
    plan = plan_for(config, "--attention_types", "linear,dot_product", "--position_embeddings", "rope", "--seeds", "2",
                    "--sweep", "training.learning_rate=5e-4,1e-3", "--sweep", "model.d_model=16,32")
    assert len(plan.cells) == 2 * 1 * 2 * 2 * 2
    first = plan.cells[0]
    assert first.name == "dot_product-rope-learning_rate=0.0005-d_model=16-seed7"
    assert first.sweep == {"training.learning_rate": 5e-4, "model.d_model": 16}
    assert "training.learning_rate=5e-4" in first.overrides() and "model.d_model=16" in first.overrides()
    assert plan.grid().sweep == {"training.learning_rate": [5e-4, 1e-3], "model.d_model": [16, 32]}
    assert len({c.name for c in plan.cells}) == len(plan.cells)
    # each cell's config is what its overrides say
    widths = {c.sweep["model.d_model"]: c.non_embedding_parameters for c in plan.cells if c.attention_type == "dot_product"}
    assert widths[32] > widths[16]


def test_one_value_sweep_is_an_override_and_presets_default_sweep(config):
    plain = plan_for(config, "--attention_types", "local", "--sweep", "training.learning_rate=3e-3")
    assert plain.axes == [] and plain.config.training.learning_rate == 3e-3 and plain.cells[0].name.endswith("-seed7")
    nano = plan_for(config, "--attention_types", "local", "--position_embeddings", "rope", "--preset", "nanogpt-cpu")
    assert nano.grid().sweep == {"training.learning_rate": [5e-4, 1e-3, 2e-3]}
    fixed = plan_for(config, "--attention_types", "local", "--position_embeddings", "rope", "--preset", "nanogpt-cpu",
                     "training.learning_rate=2e-3")
    assert fixed.axes == [] and fixed.config.training.learning_rate == 2e-3
    mine = plan_for(config, "--attention_types", "local", "--position_embeddings", "rope", "--preset", "nanogpt-cpu",
                    "--sweep", "training.learning_rate=1e-3,3e-3")
    assert mine.grid().sweep == {"training.learning_rate": [1e-3, 3e-3]}


def test_refused_encodings_are_skipped_with_their_reason(config, monkeypatch):
    monkeypatch.setattr(kernel_class("linear"), "refused_positions", {"alibi": "a test refusal"})
    plan = plan_for(config, "--attention_types", "linear,local", "--position_embeddings", "rope,alibi")
    assert [(c.attention_type, c.position_embedding) for c in plan.cells] == [("linear", "rope"), ("local", "rope"), ("local", "alibi")]
    assert [(s.attention_type, s.position_embedding, s.reason) for s in plan.skipped] == [("linear", "alibi", "a test refusal")]


def real_count(cfg) -> tuple[int, int]:
    model = build_model(cfg, vocab_size=11)
    total = sum(p.numel() for p in model.parameters())
    return total, total - 11 * cfg.model.d_model


def test_parameter_and_flop_accounting(config):
    cfg = load_config(config, attention_type="dot_product", position_embedding="rope")
    count = accounting.parameter_count(cfg, vocab_size=11)
    assert (count.total, count.non_embedding) == real_count(cfg)
    d, layers, n, heads = 32, 2, 16, 4
    attention = layers * 4 * heads * (d // heads) * (n * (n + 1) / 2) / n  # causal dot product: QK^T and AV over visible pairs
    assert accounting.training_flops_per_token(cfg) == pytest.approx(6 * count.non_embedding + 3 * attention)
    linear = with_overrides(cfg, ["attention.type=linear"])
    assert accounting.attention_forward_flops_per_token(linear) != accounting.attention_forward_flops_per_token(cfg)


def test_match_params_widens_the_mlp_of_smaller_mechanisms(config):
    plan = plan_for(config, "--attention_types", "dot_product,gqa", "--position_embeddings", "rope", "--match", "params")
    dot, gqa = plan.cells
    assert dot.adjustments == {} and set(gqa.adjustments) == {"model.mlp_ratio"} and gqa.adjustments["model.mlp_ratio"] > 4.0
    base = load_config(config, attention_type="dot_product", position_embedding="rope")
    matched = with_overrides(base, ["attention.type=gqa", *gqa.overrides()[:-1]])
    _, target = real_count(base)
    _, got = real_count(matched)
    _, unmatched = real_count(with_overrides(base, ["attention.type=gqa"]))
    assert abs(got - target) <= 0.01 * target < abs(unmatched - target)
    assert gqa.reference_non_embedding_parameters == target and gqa.non_embedding_parameters == got


def test_flop_budget_gives_each_cell_its_steps(config):
    plan = plan_for(config, "--attention_types", "dot_product,linear", "--position_embeddings", "rope", "training.flop_budget=2e9",
                    "model.context_length=128")
    assert plan.budget == "flops"
    tokens_per_step = 4 * 128
    for cell in plan.cells:
        steps = cell.adjustments["training.max_steps"]
        assert steps == int(2e9 // (cell.training_flops_per_token * tokens_per_step))
        assert cell.adjustments["training.flop_budget"] is None  # compare resolved it into steps
    assert plan.cells[0].adjustments["training.max_steps"] != plan.cells[1].adjustments["training.max_steps"]


def test_the_training_seed_override_is_the_base_seed(config):
    plan = plan_for(config, "--attention_types", "local", "--position_embeddings", "rope", "--seeds", "2", "training.seed=1338")
    assert [c.seed for c in plan.cells] == [1338, 1339] and plan.grid().base_seed == 1338
    assert [c.name for c in plan.cells] == ["local-rope-seed1338", "local-rope-seed1339"]
    assert plan.cells[1].overrides()[-1] == "training.seed=1339"  # each run's own seed is the last word


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "training.nonsense=1,2"], "--sweep training.nonsense=1: unknown key training.nonsense"),
    (["--sweep", "training.learning_rate=fast,slow"], "--sweep training.learning_rate=fast"),
    (["--sweep", "training.seed=1,2"], "--seeds"),
    (["--sweep", "attention.type=local,gqa"], "--attention_types"),
    (["--sweep", "training.learning_rate="], "give a key and one or more values"),
    (["--sweep", "training.learning_rate=1e-3,0.001"], "two values are the same"),
    (["--sweep", "training.learning_rate=1e-3,2e-3", "training.learning_rate=1e-3"], "both swept"),
    (["--match", "flops"], "--match 'flops' is not one of params"),
    (["--executor", "slurm"], "--executor 'slurm' is not one of local, ray"),
    (["--ray_address", "auto"], "--ray_address needs --executor ray"),
    (["--attention_types", "softmax"], "valid: " + ", ".join(registered_names())),
    (["--position_embeddings", "learned"], "valid: " + ", ".join(position_names())),
    (["training.flop_budget=1e9", "training.time_budget_seconds=5"], "one budget"),
    (["training.flop_budget=10"], "less than one step"),
])
def test_bad_input_is_one_line(config, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["compare", "--config", str(config), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_sweep_error_names_the_valid_keys(config, capsys):
    assert main(["compare", "--config", str(config), "--sweep", "model.width=1,2"]) == 2
    err = capsys.readouterr().err
    assert "model.width" in err and "d_model" in err and "num_layers" in err


def test_counting_a_large_model_allocates_nothing(config):
    big = with_overrides(load_config(config), ["model.d_model=2048", "model.num_layers=48", "model.num_heads=16"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    count = accounting.parameter_count(big)
    assert count.non_embedding > 2e9  # 8 GB of float32 weights, had they been allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20


def test_a_swept_option_another_mechanism_lacks_trains_it_once(config):
    plan = plan_for(config, "--attention_types", "local,linear", "--position_embeddings", "rope", "--sweep", "attention.local.window=4,8")
    assert [(c.attention_type, c.sweep["attention.local.window"]) for c in plan.cells] == [("linear", 4), ("local", 4), ("local", 8)]
    (skipped,) = plan.skipped
    assert (skipped.attention_type, skipped.sweep) == ("linear", {"attention.local.window": 8}) and "window=4" in skipped.reason
