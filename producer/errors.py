"""The errors, now in `tts_contract.errors`; kept importable here because results stored before the
move name their exception's module as `producer.errors`, and Celery imports it to raise them."""

from tts_contract.errors import *  # noqa: F403
from tts_contract.errors import __all__ as __all__
