"""The search application: ``python -m tune --space quick|seed|FILE ...`` (run from the repo root).

Also a Ray job's entry point: ``ray job submit --working-dir . -- python -m tune --space seed ...``.
The logic lives in :mod:`distunmix.tuning`.
"""
