"""TokenMap: what every position of a rendered session is, and position selectors as queries on it.

One row per position: turn, role, segment (system / user / image / assistant / template), image index, tile and
patch (row, col) for image tokens, and the label of any marked span covering it.

Selectors are small strings so that a CLI flag, a config file and a notebook say the same thing:

    all                 every position
    segment:<name>      a whole segment kind, e.g. segment:image, segment:user
    turn:<t>            every position of turn t (negative t counts from the end)
    last:<t>            the last position of turn t; last:* the last position of every turn
    image:<k>           the patch tokens of image k (wrapper and newline tokens excluded)
    mark:<label>        the tokens of every span marked <label>, e.g. mark:ssn
    final               the last position of the session

Join selectors with '+' for a union: "mark:ssn+last:*".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SEGMENTS = ("system", "user", "image", "assistant", "template")

COLUMNS = ["position", "token_id", "turn", "role", "segment", "image_index", "tile", "patch_row", "patch_col", "mark"]


class SelectorError(ValueError):
    pass


@dataclass
class TokenMap:
    """Per-position facts of a rendered session, as a DataFrame with the columns in `COLUMNS`."""

    df: pd.DataFrame

    def __len__(self) -> int:
        return len(self.df)

    @property
    def n_turns(self) -> int:
        return int(self.df["turn"].max()) + 1

    def turn_bounds(self, turn: int) -> tuple[int, int]:
        """[start, end) positions of `turn`."""
        pos = self.df.index[self.df["turn"].to_numpy() == turn]
        if len(pos) == 0:
            raise SelectorError(f"turn {turn} has no tokens (session has {self.n_turns} turns)")
        return int(pos[0]), int(pos[-1]) + 1

    def select(self, selector: str) -> np.ndarray:
        """Sorted unique positions picked by `selector` (see the module docstring)."""
        picked = [self._select_one(part.strip()) for part in selector.split("+") if part.strip()]
        if not picked:
            raise SelectorError(f"empty position selector {selector!r}")
        return np.unique(np.concatenate(picked)).astype(np.int64)

    def _select_one(self, sel: str) -> np.ndarray:
        df = self.df
        pos = df["position"].to_numpy()
        kind, _, arg = sel.partition(":")
        if kind == "all":
            return pos
        if kind == "final":
            return pos[-1:]
        if kind == "segment":
            if arg not in SEGMENTS:
                raise SelectorError(f"selector {sel!r}: segment must be one of {SEGMENTS}")
            return pos[df["segment"].to_numpy() == arg]
        if kind in ("turn", "last"):
            turns = df["turn"].to_numpy()
            if kind == "last" and arg == "*":
                last = np.r_[turns[1:] != turns[:-1], True]
                return pos[last]
            t = _int_arg(sel, arg)
            if t < 0:
                t += self.n_turns
            if not 0 <= t < self.n_turns:
                return pos[:0]
            in_turn = pos[turns == t]
            return in_turn if kind == "turn" else in_turn[-1:]
        if kind == "image":
            k = _int_arg(sel, arg)
            m = (df["image_index"].to_numpy() == k) & (df["patch_row"].to_numpy() >= 0)
            return pos[m]
        if kind == "mark":
            if not arg:
                raise SelectorError(f"selector {sel!r}: give a mark label, e.g. mark:ssn")
            marks = df["mark"].to_numpy()
            return pos[[arg in str(m).split("|") for m in marks]] if len(marks) else pos[:0]
        raise SelectorError(
            f"unknown position selector {sel!r}: use all, final, segment:<name>, turn:<t>, last:<t>, last:*, "
            "image:<k> or mark:<label>"
        )


def _int_arg(sel: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError as err:
        raise SelectorError(f"selector {sel!r}: expected an integer after ':'") from err
