"""The config schema: shipped configs, overrides, one-line errors, derived values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_comparison.attention.registry import kernel_options, registered_names
from transformer_comparison.config import (
    Config,
    config_to_yaml,
    kernel_options_for,
    kv_heads_for,
    load_config,
    save_config,
    with_overrides,
)
from transformer_comparison.errors import UserError
from transformer_comparison.position import position_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ATTENTION_NAMES = registered_names()
POSITION_NAMES = position_names()


def user_error(*args, **kwargs) -> str:
    """The message of the UserError load_config raises; it must be one line."""
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --- shipped configs -------------------------------------------------------------------------


def test_default_config_file_lists_every_plain_key_with_the_schema_defaults():
    raw = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    defaults = Config().model_dump()
    assert set(raw) == set(defaults)
    for section, keys in raw.items():  # mechanism / encoding subsections may be left out
        plain = {key for key, value in defaults[section].items() if not isinstance(value, dict)}
        assert plain <= set(keys) <= set(defaults[section])
    assert load_config(CONFIGS / "config.yaml") == Config()
    assert load_config(None) == Config()


def test_the_schema_is_derived_from_the_registries():
    attention = Config.model_fields["attention"].annotation
    for name in ATTENTION_NAMES:
        if kernel_options(name):
            assert set(attention.model_fields[name].annotation.model_fields) == set(kernel_options(name))
    cfg = load_config(None, attention_type=ATTENTION_NAMES[-1], position_embedding="nope")
    assert (cfg.attention.type, cfg.position.type) == (ATTENTION_NAMES[-1], "nope")


def test_flat_option_keys_of_older_configs_still_work(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("attention:\n  type: local\n  window: 7\n  top_k: 3\n  gqa_kv_heads: 1\nposition:\n  rope_base: 500.0\n")
    cfg = load_config(path)
    assert (cfg.attention.local.window, cfg.attention.sparse.top_k, cfg.attention.gqa.kv_heads) == (7, 3, 1)
    assert cfg.position.rope.base == 500.0
    later = load_config(path, ["attention.local.window=9"])  # an override wins over the file
    assert later.attention.local.window == 9
    assert load_config(path, ["attention.window=11"]).attention.local.window == 11


def test_an_option_the_mechanism_does_not_have_is_an_error():
    message = user_error(None, ["attention.dot_product.window=3"])
    assert "attention.dot_product" in message
    message = user_error(None, ["attention.local.windw=3"])
    assert "attention.local.windw" in message and "window" in message
    message = user_error(None, ["attention.no_such_option=3"])
    assert "no_such_option" in message and "window (local)" in message


def test_nanogpt_cpu_config_is_the_nanogpt_recipe():
    cfg = load_config(CONFIGS / "nanogpt_cpu.yaml")
    m, t, d = cfg.model, cfg.training, cfg.data
    assert (m.num_layers, m.num_heads, m.d_model, m.context_length, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.max_steps, t.num_epochs, t.warmup_steps) == (12, 2000, None, 100)
    assert (t.learning_rate, t.min_learning_rate, t.beta1, t.beta2) == (1e-3, 1e-4, 0.9, 0.99)
    assert (t.weight_decay, t.grad_clip, t.eval_batches) == (0.1, 1.0, None)
    assert (d.dataset, d.tokenizer, d.val_fraction) == ("tinyshakespeare", "char", 0.1)


def test_shipped_config_survives_a_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "nanogpt_cpu.yaml", attention_type="gqa", position_embedding="rope")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["attention"]["type"] == "gqa"


def test_a_partial_file_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("model:\n  d_model: 64\ntraining:\n  learning_rate: 3e-4\n")
    cfg = load_config(path)
    assert cfg.model.d_model == 64 and cfg.training.learning_rate == 3e-4 and cfg.model.num_layers == 4


# --- overrides -------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(CONFIGS / "config.yaml", [
        "training.learning_rate=3e-4", "model.num_layers=2", "model.bias=true", "training.eval_batches=null",
        "training.device=cuda:1", "model.dropout=0", "logging.project=123", "data.dataset=/tmp/x y.txt",
        "logging.entity=~",
    ])
    assert cfg.training.learning_rate == 3e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.model.num_layers == 2 and cfg.model.bias is True
    assert cfg.training.eval_batches is None and cfg.training.device == "cuda:1"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.logging.project == "123" and cfg.data.dataset == "/tmp/x y.txt" and cfg.logging.entity is None


def test_attention_and_position_arguments_win_over_the_file_and_must_agree_with_overrides():
    cfg = load_config(CONFIGS / "config.yaml", attention_type="linear", position_embedding="alibi")
    assert (cfg.attention.type, cfg.position.type) == ("linear", "alibi")
    assert load_config(None, ["attention.type=linear"], attention_type="linear").attention.type == "linear"
    message = user_error(None, ["attention.type=flash"], attention_type="local")
    assert "--attention_type local" in message and "attention.type=flash" in message
    assert "--position_embedding" in user_error(None, ["position.type=rope"], position_embedding="alibi")


def test_training_by_epochs():
    cfg = load_config(None, ["training.max_steps=null", "training.num_epochs=1.5"])
    assert cfg.training.num_epochs == 1.5 and cfg.training.max_steps is None


def test_with_overrides_copies():
    cfg = Config()
    changed = with_overrides(cfg, ["model.d_model=64"])
    assert changed.model.d_model == 64 and cfg.model.d_model == 128


# --- one-line errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.nonsense=1"], "model.nonsense"),
    (["nonsense.key=1"], "nonsense"),
    (["training.batch_size=abc"], "training.batch_size"),
    (["training.batch_size=1.5"], "training.batch_size"),
    (["model.bias=2"], "model.bias"),
    (["training.learning_rate=-1e-3"], "training.learning_rate"),
    (["training.learning_rate=.nan"], "training.learning_rate"),
    (["model.dropout=1.0"], "model.dropout"),
    (["data.val_fraction=0"], "data.val_fraction"),
    (["model.d_model=130"], "model.d_model"),
    (["model.d_model=12", "position.type=rope"], "model.d_model"),
    (["attention.num_kv_heads=3"], "attention.num_kv_heads"),
    (["attention.num_kv_heads=8"], "attention.num_kv_heads"),
    (["attention.gqa_kv_heads=4", "attention.type=gqa"], "attention.gqa.kv_heads"),
    (["attention.gqa.kv_heads=3", "attention.type=gqa"], "attention.gqa.kv_heads"),
    (["model.num_heads=1", "attention.type=gqa"], "attention.type"),
    (["attention.local.window=0"], "attention.local.window"),
    (["position.rope.base=0"], "position.rope.base"),
    (["position.rope.scaling=cubic"], "position.rope.scaling"),
    (["training.seed=-1"], "training.seed"),
    (["training.seed=99999999999999"], "training.seed"),
    (["attention.type=softmax"], "attention.type"),
    (["position.type=learned"], "position.type"),
    (["training.device=gpu"], "training.device"),
    (["training.dtype=float64"], "training.dtype"),
    (["training.num_epochs=2"], "training.num_epochs"),
    (["training.min_learning_rate=0.1"], "training.min_learning_rate"),
    (["data.tokenizer=words"], "data.tokenizer"),
    (["data.bpe_vocab_size=100"], "data.bpe_vocab_size"),
    (["data.tokenizer=byte", "model.vocab_size=100"], "model.vocab_size"),
    (["logging.wandb=on"], "logging.wandb"),
    (["training.learning_rate"], "section.key=value"),
    (["model.dropout=[0.1"], "not valid YAML"),
    (["model.short_conv=1"], "model.short_conv"),
    (["model.short_conv=-2"], "model.short_conv"),
])
def test_bad_values_give_one_line_naming_the_key(overrides, expected):
    assert expected in user_error(None, overrides)


def test_bad_value_message_shows_the_value_and_what_is_allowed():
    message = user_error(None, ["position.type=learned"])
    assert "'learned'" in message and "sinusoidal" in message and "alibi" in message
    assert "greater than 0" in user_error(None, ["training.learning_rate=-1"])
    assert "allowed: [1, 2, 4]" in user_error(None, ["attention.num_kv_heads=3"])


def test_unknown_key_lists_the_valid_keys(tmp_path):
    message = user_error(None, ["model.n_layer=2"])
    assert "model.n_layer" in message and "num_layers" in message and "context_length" in message
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 0.1\n  batch_size: 8\n")
    message = user_error(path)
    assert "training.lr" in message and "learning_rate" in message
    path.write_text("optimizer:\n  lr: 0.1\n")
    assert "'optimizer'" in user_error(path) and "training" in user_error(path)


def test_wrong_types_in_a_file_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: '4'\n")
    assert "model.num_layers" in user_error(path)
    path.write_text("model: 4\n")
    assert "model" in user_error(path)


def test_file_problems_say_so(tmp_path):
    assert "does not exist" in user_error(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in user_error(bad)
    bad.write_text("- a list\n")
    assert "mapping" in user_error(bad)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="model.d_model"):
        Config(model={"d_model": 130})


# --- derived values --------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "expected"), [(2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (12, 6)])
def test_gqa_default_kv_heads(heads, expected):
    cfg = load_config(None, [f"model.num_heads={heads}", f"model.d_model={heads * 16}"], attention_type="gqa")
    assert kv_heads_for(cfg) == expected


def test_kv_heads_for():
    assert kv_heads_for(Config()) == 4
    assert kv_heads_for(load_config(None, ["attention.num_kv_heads=2"])) == 2
    assert kv_heads_for(load_config(None, ["attention.gqa.kv_heads=1", "attention.num_kv_heads=2"], attention_type="gqa")) == 1
    assert kv_heads_for(load_config(None, ["attention.gqa.kv_heads=1"])) == 4  # only gqa reads its kv_heads


def test_kernel_options_are_the_mechanism_subsection():
    from transformer_comparison.attention import build_attention

    for name in ATTENTION_NAMES:
        cfg = load_config(None, attention_type=name)
        options = kernel_options_for(cfg)
        assert options == kernel_options(name)  # one set of defaults: the constructor's
        build_attention(name, **options)
    assert kernel_options_for(load_config(None, ["attention.window=7"], attention_type="local")) == {"window": 7, "sinks": 0}
    assert kernel_options_for(load_config(None, ["attention.use_sdpa=true"], attention_type="flash"))["use_sdpa"] is True


def test_yaml_duplicate_keys_and_alias_bombs_are_refused(tmp_path):
    import time

    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  d_model: 64\n  d_model: 128\n")
    assert "given twice" in user_error(path)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        previous = "a" if level == 1 else f"l{level - 1}"
        bomb.append(f"l{level}: &l{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path.write_text("\n".join(bomb) + "\n")
    start = time.perf_counter()
    assert "expands to more than" in user_error(path)
    assert time.perf_counter() - start < 1.0


@settings(max_examples=40, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.integers(1, 8).map(lambda x: 2 * x),
    lr=st.floats(1e-6, 1.0, allow_nan=False),
    attention=st.sampled_from([n for n in ATTENTION_NAMES if n != "gqa"]),
    position=st.sampled_from(POSITION_NAMES),
)
def test_valid_configs_round_trip_through_yaml(heads, head_dim, lr, attention, position):
    cfg = load_config(None, [f"model.num_heads={heads}", f"model.d_model={heads * head_dim}",
                             f"training.learning_rate={lr!r}", "training.min_learning_rate=0"],
                      attention_type=attention, position_embedding=position)
    assert cfg.training.learning_rate == lr
    assert Config.model_validate(yaml.safe_load(config_to_yaml(cfg))) == cfg
