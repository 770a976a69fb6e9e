"""What a report generator gets: the rows of one sweep invocation, where to write, and a place for notes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


class Skip(Exception):
    """A generator does not apply to these rows (the reason is reported, nothing is written)."""


@dataclass
class Context:
    df: "object"                 # pandas DataFrame of the rows
    out_dir: str
    flops: str = "analytic_all"  # reports.data.FLOPS_COLUMNS key
    notes: List[str] = field(default_factory=list)
    by_method: bool = False      # one series per method (the every-sweep overview), not per sweep entry
    warnings: List[str] = field(default_factory=list)   # stated at the top of the index and in every caption

    def note(self, text: str) -> None:
        self.notes.append(text)

    def caption(self, flops_desc: str = "") -> str:
        from reports.data import caption_facts
        warn = "".join(f" WARNING: {w}." for w in self.warnings)
        return caption_facts(self.df, flops_desc) + warn

    def subset(self, mask) -> "Context":
        return Context(self.df[mask], self.out_dir, self.flops, self.notes, self.by_method, self.warnings)
