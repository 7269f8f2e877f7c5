"""``python -m tune``: Ray Tune search with ASHA over distunmix training settings (``distunmix tune``)."""

import sys

from distunmix.cli.train import tune_main

sys.exit(tune_main())
