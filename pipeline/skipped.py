"""What a listing or a tar reader left out, said rather than silent.

The files under an input prefix and the tar members that the extension filter does not take
are counted by lower-case extension, with a few names of each: a folder of formats the
filter does not take must be reported (the compress summary's ``skipped_this_job``), not
become a small archive in silence. Listing and reading run in many tasks, so a
:class:`Skipped` is made per task and merged, and merging gives the same report in any order.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SKIPPED_EXAMPLES = 5  # names shown per skipped extension


@dataclass
class Skipped:
    """Skipped names counted by extension ("" for none), with the smallest few of each as
    examples (the smallest, so that the report does not depend on which task came first)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str) -> None:
        extension = posixpath.splitext(name)[1].lower()
        self.counts[extension] += 1
        self._keep(extension, [name])

    def merge(self, other: Skipped) -> None:
        for extension, count in other.counts.items():
            self.counts[extension] += count
            self._keep(extension, other.examples.get(extension, []))

    def _keep(self, extension: str, names: list[str]) -> None:
        self.examples[extension] = sorted(set(self.examples.get(extension, [])) | set(names))[:SKIPPED_EXAMPLES]

    def report(self) -> dict[str, Any]:
        """For the job summary: the total, then each extension (most common first)."""
        return {
            "count": sum(self.counts.values()),
            "by_extension": {
                extension: {"count": count, "examples": self.examples[extension]}
                for extension, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))
            },
        }
