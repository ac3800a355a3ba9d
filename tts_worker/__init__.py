"""The GPU worker of the text-to-speech queue: `celery -A tts_worker worker`.

Celery finds the app in `tts_worker.celery`; importing this package itself loads nothing heavy.
"""

import importlib.util
import os

# The engines' libraries draw tqdm progress bars on stderr (IndexTTS2 one per segment, transformers
# one per model it loads), and a worker logs every redraw as a line of its own. tqdm reads
# TQDM_DISABLE once, when it is first imported: hence here, before anything of the worker imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

# A project installed without an extra is the producer alone: name what a worker needs before the
# first import of it fails on one missing module.
_WORKER_EXTRA = ("boto3", "numpy", "soundfile", "tenacity")
if _missing := [name for name in _WORKER_EXTRA if importlib.util.find_spec(name) is None]:
    raise ImportError(
        f"tts_worker needs the worker extra (missing {', '.join(_missing)}): pip install "
        "'indextts-queue[cpu]' (Piper), '[gpu]' (IndexTTS2), '[gpu25]' (IndexTTS-2.5) or '[worker]'"
    )
