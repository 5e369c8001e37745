"""transformers' own logging and progress bars, silenced: lowbit reports what went wrong in one line."""
from __future__ import annotations

import logging


def quiet_transformers() -> None:
    """Only errors from transformers, and no download / loading progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
