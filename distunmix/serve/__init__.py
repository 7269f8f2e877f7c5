"""Serving: the Ray-free service (:mod:`.service`), the Ray Serve app (:mod:`.app`), the HTTP client
(:mod:`.client`). Import :mod:`.app` only where Ray Serve runs: it imports Ray and FastAPI."""
