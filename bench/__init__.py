"""``make bench``: the gateway under load, against the sandbox standing in for TikTok.

* ``bench.loadgen``: the load generator, one process of raw HTTP/1.1 keep-alive
  connections on asyncio (cheap enough not to be the bottleneck on 2 cores).
* ``bench.run`` (``python -m bench``): starts the sandbox, the gateway (and
  SecantusDB for ``--store mongodb``) as processes, runs the scenarios, measures,
  prints, writes ``artifacts/bench.json`` and the chart.
* ``bench.plot``: the chart (matplotlib, Agg).
* issue 14's benchmarks, each runnable alone and from ``python -m bench --only``:
  ``bench.burst`` (1,000 callbacks in a second against TikTok's user-info limit,
  through one gateway and through two sharing MongoDB), ``bench.simulate`` (a million
  accounts over 200 days on a virtual clock, the real refresh policy and budget) and
  ``bench.mongo_scale`` (the background queries' plans and a round's memory at
  10,000 and 100,000 accounts).
"""
