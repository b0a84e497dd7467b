"""The config schema: shipped configs, overrides, one-line errors, derived values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_comparison.config import (
    ATTENTION_NAMES,
    POSITION_NAMES,
    AttentionConfig,
    Config,
    config_to_yaml,
    kernel_options_for,
    kv_heads_for,
    load_config,
    save_config,
    with_overrides,
)
from transformer_comparison.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def user_error(*args, **kwargs) -> str:
    """The message of the UserError load_config raises; it must be one line."""
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def attention_package():
    """The real kernels, or a skip while some of them are still being written."""
    try:
        import transformer_comparison.attention as attention
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"transformer_comparison.attention does not import yet: {error}")
    return attention


# --- shipped configs -------------------------------------------------------------------------


def test_default_config_file_lists_every_key_with_the_schema_defaults():
    raw = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    assert {section: set(keys) for section, keys in raw.items()} == {
        section: set(keys) for section, keys in Config().model_dump().items()
    }
    assert load_config(CONFIGS / "config.yaml") == Config()
    assert load_config(None) == Config()


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


def test_attention_and_position_arguments_win_over_overrides():
    cfg = load_config(None, ["attention.type=local"], attention_type="linear", position_embedding="alibi")
    assert (cfg.attention.type, cfg.position.type) == ("linear", "alibi")


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
    (["attention.gqa_kv_heads=4"], "attention.gqa_kv_heads"),
    (["attention.gqa_kv_heads=3"], "attention.gqa_kv_heads"),
    (["model.num_heads=1", "attention.type=gqa"], "attention.type"),
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
    assert kv_heads_for(load_config(None, ["attention.gqa_kv_heads=1", "attention.num_kv_heads=2"], attention_type="gqa")) == 1
    assert kv_heads_for(load_config(None, ["attention.gqa_kv_heads=1"])) == 4  # only gqa reads gqa_kv_heads


def test_names_agree_with_the_packages():
    from transformer_comparison.position import POSITION_TYPES

    assert POSITION_NAMES == POSITION_TYPES
    assert ATTENTION_NAMES == attention_package().ATTENTION_TYPES


def test_kernel_options_come_from_the_attention_section():
    attention = attention_package()
    from transformer_comparison.attention.registry import kernel_options, registered_names

    for name in registered_names():  # those written so far
        cfg = load_config(None, attention_type=name)
        options = kernel_options_for(cfg)
        # options the config has are passed; kernel-only ones (linear's eps) keep their defaults
        assert set(options) == set(kernel_options(name)) & set(AttentionConfig.model_fields)
        assert all(options[key] == getattr(cfg.attention, key) for key in options)
        attention.build_attention(name, **options)
    assert kernel_options_for(load_config(None, ["attention.window=7"], attention_type="local")) == {"window": 7}
    assert kernel_options_for(load_config(None, ["attention.use_sdpa=true"], attention_type="flash"))["use_sdpa"] is True


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
