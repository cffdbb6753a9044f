"""PyJWT for our HS256 tokens, with each key checked once instead of per token.

PyJWT checks an HMAC key every time it signs or verifies: not empty, not a PEM,
SSH or DER key (it tries to load it as one), not a JWK in JSON. Sound, but our
keys come from the configuration and never change, and that parsing was a
visible share of a callback's CPU. This algorithm object keeps the outcome per
key (the same checks, the same error for a bad key, run once).
"""

from __future__ import annotations

from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

ALGORITHM = "HS256"
# Our keys: the state key(s) and the product's bearer key. More than this and
# something is passing keys that are not ours: stop remembering them.
MAX_REMEMBERED_KEYS = 16


class _KeyCheckedOnceHS256(HMACAlgorithm):
    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: dict[Any, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) < MAX_REMEMBERED_KEYS:
                self._prepared[key] = prepared
        return prepared


def hs256_jwt(options: dict[str, Any] | None = None) -> jwt.PyJWT:
    """A ``jwt.PyJWT`` whose HS256 checks each key once (other algorithms unchanged)."""
    codec = jwt.PyJWT(options=options)  # type: ignore[arg-type]
    # PyJWT keeps its per-instance algorithm registry on its PyJWS (PyJWT 2.x).
    signer = codec._jws
    signer.unregister_algorithm(ALGORITHM)
    signer.register_algorithm(ALGORITHM, _KeyCheckedOnceHS256())
    return codec
