"""Serving export directories: the Open Inference Protocol (`oip`, no server), the Ray Serve
applications (`app`, imports Ray), their Serve config, the load test client and Triton model
repositories. The `serve` extra's code lives only here."""
