"""The Ray Serve application: ``serve run serve/config.yaml`` (from the repo root) or ``distunmix serve``.

The deployment is a thin shell around :class:`distunmix.serving.SeparationService`.
"""
