"""The search application: ``python -m tune --space quick|seed|FILE ...`` (run from the repo root).

Also a Ray job's entry point: ``ray job submit --working-dir . -- python -m tune --space seed ...``.
A thin entry point: the logic and the built-in spaces live in :mod:`distunmix.tuning`, and
``distunmix tune`` is the same command where the package is installed.
"""
