"""What a report generator gets: the rows of one sweep invocation, where to write, and a place for notes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from reports.protocol import short_warning
from reports.style import METHODS_FILE


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

    def caption(self, flops_desc: str = "", shown=None) -> str:
        """The end of every caption: how many of the report's runs the figure or table shows (`shown`: a DataFrame
        of them, default every row), a short form of each warning, and where the shared protocol is (methods.md:
        samples, seeds, machine, intervals, what paired means, the rules; reports.protocol). flops_desc: kept
        for callers, the MAC column is described there."""
        rows = self.df if shown is None else shown
        n, total = len(rows), len(self.df)
        count = (f"Shows {n} of the {total} runs." if n != total else f"{total} run{'' if total == 1 else 's'}.")
        warn = "".join(f" WARNING: {short_warning(w)}." for w in self.warnings)
        return f"{count}{warn} Protocol: {METHODS_FILE}."

    def rows(self, *parts) -> "object":
        """The report's rows at the given positions (lists of positional indices) or in the given DataFrames
        (subsets of self.df), each once, in table order: what a figure drew, for its caption."""
        keep = set()
        for part in parts:
            keep.update(part.index if hasattr(part, "columns") else (self.df.index[i] for i in part))
        return self.df[[i in keep for i in self.df.index]]

    def subset(self, mask) -> "Context":
        return Context(self.df[mask], self.out_dir, self.flops, self.notes, self.by_method, self.warnings)
