"""The task's name and the queues: what producers send to and workers read."""

from __future__ import annotations

__all__ = ["BACKFILL_QUEUE", "INTERACTIVE_QUEUE", "QUEUES", "TASK_NAME"]

TASK_NAME = "tts.synthesize"
INTERACTIVE_QUEUE = "tts"
"""Where `tts.delay` sends jobs; workers read it before the backfill queue."""
BACKFILL_QUEUE = "tts.backfill"
"""Where batch backfills send jobs, so that interactive calls are never stuck behind them."""
QUEUES = (INTERACTIVE_QUEUE, BACKFILL_QUEUE)
"""Every queue the project sends to, in the order workers read them."""
