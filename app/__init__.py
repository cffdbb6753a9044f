"""The gateway application, apart from the entry point (``server.py``).

``app.wiring`` builds it (the dependencies, the routes, the background workers),
``app.lifecycle`` runs one process (serve, store start-up, graceful shutdown),
``app.workers`` supervises ``WORKERS`` forked processes, and ``app.gateway`` is the
``Gateway`` they hand around. ``server.py`` re-exports the names an embedding host
uses; docs/architecture.md draws the rooms.
"""
