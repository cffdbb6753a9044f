"""The browser demo (``DEMO_MODE=1``): a stand-in product served by the gateway itself.

``demo.product`` is the product's backend; ``demo/templates`` its pages. The
handlers live in ``handlers.demo``. Nothing here is mounted unless demo mode is on.
"""
