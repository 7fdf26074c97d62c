"""The one rule for how many inputs a stage may refuse before the run itself is wrong.

Ingest, shard and external evaluation each record every refused input with its
reason; past `data.max_reject_fraction` of them the likely cause is a wrong
dataset root or a broken copy, not a few bad files, and the stage stops -- after
writing the whole rejects list where the user can read it (evidence, not a guess).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import CxrError


def check_reject_fraction(
    rejects: list[dict[str, Any]],
    total: int,
    limit: float,
    what: str,
    root: Any,
    write_evidence: Callable[[str], Path] | None = None,
) -> None:
    """Raise CxrError when more than `limit` of `total` `what` (e.g. "label lines") were rejected.

    `write_evidence(message)` is called first and returns the file holding every reject, which
    the error then names.
    """
    if len(rejects) <= limit * total:
        return
    message = (
        f"{len(rejects)} of {total} {what} rejected ({len(rejects) / max(total, 1):.1%} > {limit:.0%}): "
        f"is {root} the right dataset root? First reasons: " + "; ".join(str(r["reason"]) for r in rejects[:3])
    )
    if write_evidence is not None:
        message += f" (all rejects in {write_evidence(message)})"
    raise CxrError(message)
