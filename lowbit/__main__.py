"""``python -m lowbit``: the ``lowbit`` command (``torchrun --nproc-per-node N -m lowbit quantize ...``)."""
import sys

from .cli import main

sys.exit(main())
