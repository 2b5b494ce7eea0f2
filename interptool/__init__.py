"""interptool: how interpretable is a classifier, and how does a distilled student compare?

Pipeline: loading -> data -> cache -> analyzers -> report -> cli (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"
