"""Reader statistics: what was read, and every documented repair, counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReaderStats:
    """Counters over a reader's life (all epochs).

    rows: rows converted (after the label policy); label_chain_violations: rows breaking the
    label chain; rows_dropped: of those, rows dropped by ``label_chain_policy: drop``;
    empty_bags: per sparse feature, rows whose bag is empty (missing id, empty tag list);
    null_raw: per RawFeature, null rows (read as 0.0); empty_files: files skipped for having no rows.
    """

    rows: int = 0
    label_chain_violations: int = 0
    rows_dropped: int = 0
    empty_bags: Counter = field(default_factory=Counter)
    null_raw: Counter = field(default_factory=Counter)
    empty_files: list[str] = field(default_factory=list)

    def add(self, other: ReaderStats) -> None:
        self.rows += other.rows
        self.label_chain_violations += other.label_chain_violations
        self.rows_dropped += other.rows_dropped
        self.empty_bags.update(other.empty_bags)
        self.null_raw.update(other.null_raw)
        self.empty_files += other.empty_files
