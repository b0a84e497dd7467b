"""Issue 10's config cases (config.py is the lead's): each must be a one-line UserError naming the problem.

These are config.py's guarantees (issue 10): each failed before config_io.py refused it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from transformer_comparison.config import load_config
from transformer_comparison.errors import UserError



ALIAS_BOMB = textwrap.dedent("""\
    a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    model: {d_model: *h}
""")


def refused(path, *args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        load_config(path, *args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    code = f"from transformer_comparison.config import load_config\nload_config({str(path)!r})"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert "UserError" in result.stderr and "MemoryError" not in result.stderr
    assert elapsed < 10  # process start included; the refusal itself must be well under a second


def test_duplicate_keys_in_a_mapping_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  learning_rate: 0.001\n  learning_rate: 0.1\n")
    assert "learning_rate" in refused(path)


def test_a_flag_and_an_override_that_disagree_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    message = refused(path, ["attention.type=flash"], attention_type="local")
    assert "attention.type" in message and "local" in message and "flash" in message


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_negative_or_huge_seed_is_refused_naming_the_key(tmp_path, seed):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    assert "training.seed" in refused(path, [f"training.seed={seed}"])
