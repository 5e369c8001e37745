"""``python -m lowbit.cli``."""
import sys

from . import main

sys.exit(main())
