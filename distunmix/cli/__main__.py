"""``python -m distunmix.cli``: the same as the ``distunmix`` console script."""

import sys

from . import main

sys.exit(main())
