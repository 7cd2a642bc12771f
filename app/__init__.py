"""idforge service: settings, the job contract, the Redis job store, storage and the HTTP edge.

This package never imports torch, `models` or `workers` at import time (a test checks it).
"""

__version__ = "0.1.0"
