"""The worker supervisor (``WORKERS`` above 1): one bound port, forked processes that
each run ``app.lifecycle.serve``, restarted when they crash, stopped together."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys

import tornado.netutil
import tornado.process

from app.lifecycle import STOP_SIGNALS, serve
from services.config import Config
from services.metrics import enable_multiprocess, leave_multiprocess, prepare_multiprocess_dir

log = logging.getLogger("gateway")


def run_workers(config: Config) -> int:
    """Fork ``config.workers`` processes serving one port; this process supervises.

    The socket is bound before the fork and before any event loop exists; Tornado's
    ``fork_processes`` restarts a worker that crashes. SIGTERM or SIGINT here closes
    this process's end of a pipe each worker watches (its lifeline) and its copy of
    the socket: every worker then shuts down gracefully and exits 0, and so does
    this process once they are all gone. A worker whose parent dies sees the pipe
    close too, and stops. The workers keep their metrics in one directory, so a
    scrape of any worker's ``/metrics`` reports them all.
    """
    try:
        metrics_dir, temporary_metrics_dir = prepare_multiprocess_dir(
            config.prometheus_multiproc_dir
        )
    except OSError as exc:
        print(f"tiktok-gateway: no directory for the workers' metrics "
              f"(PROMETHEUS_MULTIPROC_DIR): {exc}", file=sys.stderr)
        return 2
    sockets = tornado.netutil.bind_sockets(config.port, address=config.host)
    lifeline, lifeline_end = os.pipe()
    stopping = False

    def stop_workers(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("%s: stopping the workers", signal.Signals(signum).name)
        os.close(lifeline_end)
        for sock in sockets:
            sock.close()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_workers)
    # Workers are born with the stop signals blocked, until serve() handles them.
    os.register_at_fork(
        before=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS),
        after_in_parent=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS),
    )
    port = sockets[0].getsockname()[1]
    log.info(
        "TikTok gateway listening on http://%s:%d with %d workers (supervisor pid %d)",
        config.host,
        port,
        config.workers,
        os.getpid(),
    )
    log.info("the workers' metrics are kept in %s", metrics_dir)
    try:
        tornado.process.fork_processes(config.workers)
    except RuntimeError as exc:  # too many restarts
        log.error("giving up: %s", exc)
        return 1
    except SystemExit:
        log.info("all workers stopped")
        return 0
    finally:
        # Only the supervisor gets here before the workers' code below.
        if temporary_metrics_dir and tornado.process.task_id() is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    # A worker from here on.
    if stopping:
        return 0  # forked to replace a crashed worker after shutdown began
    os.close(lifeline_end)
    enable_multiprocess(metrics_dir)
    try:
        asyncio.run(serve(config, sockets, lifeline))
    finally:
        leave_multiprocess()
    return 0
