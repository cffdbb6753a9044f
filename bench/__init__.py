"""``make bench``: the gateway under load, against the sandbox standing in for TikTok.

* ``bench.loadgen``: the load generator, one process of raw HTTP/1.1 keep-alive
  connections on asyncio (cheap enough not to be the bottleneck on 2 cores).
* ``bench.run`` (``python -m bench``): starts the sandbox, the gateway (and
  SecantusDB for ``--store mongodb``) as processes, runs the scenarios, measures,
  prints, writes ``artifacts/bench.json`` and the chart.
* ``bench.plot``: the chart (matplotlib, Agg).
"""
