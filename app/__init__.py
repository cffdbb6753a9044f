"""The gateway application, apart from the entry point (``server.py``).

``app.wiring`` builds it (the ``Gateway`` of dependencies, the routes, the background
workers), ``app.lifecycle`` runs one process (store start-up, serving, graceful
shutdown) and ``app.workers`` supervises ``WORKERS`` forked processes. ``server.py``
re-exports the names an embedding host uses; docs/architecture.md draws the rooms.
"""
