"""The browser demo (``DEMO_MODE=1``): a stand-in product served by the gateway itself.

The whole demo lives here: ``demo.product`` is the product's backend (it talks to the
gateway over HTTP only), ``demo.handlers`` its pages and their routes, ``templates``
their rendering. The gateway mounts ``routes`` from one line in ``app.wiring.routes``, and
only in demo mode; delete that line and this directory and the demo is gone.
"""

from demo.handlers import routes

__all__ = ["routes"]
