"""extrapolation.csv (`tcompare eval`): one row per evaluation length, columns in this order.

    write_csv(path, rows, ExtrapolationRow); rows = read_csv(path, ExtrapolationRow)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ExtrapolationRow(BaseModel):
    """The validation loss of a run at one evaluation length (see evaluate.py for the windows)."""

    model_config = ConfigDict(extra="forbid")

    eval_length: int
    stride: int
    val_loss: float | None
    val_perplexity: float | None  # None (an empty cell) where exp(loss) overflows
    num_windows: int
    tokens_scored: int
    train_context_length: int
    attention_type: str
    position_embedding: str
    position_scaling: str = "none"  # an evaluation-time scaling of the encoding, e.g. "yarn:4" (tcompare eval --rope_scaling)


CSV_COLUMNS = list(ExtrapolationRow.model_fields)
