"""`python -m producer.backfill` runs `tts-backfill`."""

from __future__ import annotations

from producer.backfill.cli import main

raise SystemExit(main())
