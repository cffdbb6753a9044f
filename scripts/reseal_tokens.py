"""Encrypt every stored token again with the current key: the last step of a key rotation.

    python scripts/reseal_tokens.py

Run it with the gateway's own environment (the same ``MONGODB_URI`` and
``TOKEN_ENCRYPTION_KEYS``, the new key first and the old one still listed) once every
instance runs with the new key first. It walks the accounts in id order, in batches,
and rewrites the tokens of those still under an older key; a refresh or a disconnect
that runs at the same time wins, never the other way round. It can run while the
gateway serves, and again at any time: accounts already done are left alone.

When it reports no unreadable account, the old key may be dropped from
``TOKEN_ENCRYPTION_KEYS``. Exit codes: 0 done, 1 some accounts no configured key
opens (listed by id; they need reconnecting), 2 a configuration or store error.
It prints counts and account ids only, never a token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import ConfigError, GatewayError  # noqa: E402
from server import configure_logging, create_store  # noqa: E402
from services.config import load_config  # noqa: E402
from storage.base import ResealBatch, Store  # noqa: E402
from storage.memory import MemoryStore  # noqa: E402

log = logging.getLogger("gateway.reseal")
BATCH = 200


async def reseal_all(store: Store, batch_size: int = BATCH) -> ResealBatch:
    """Every account, batch after batch; the totals (``last_id``: the last account)."""
    total = ResealBatch(last_id=None)
    after: str | None = None
    while True:
        batch = await store.reseal_tokens(after=after, limit=batch_size)
        if batch.last_id is None:
            return total
        total.last_id = after = batch.last_id
        total.resealed += batch.resealed
        total.current += batch.current
        total.changed += batch.changed
        total.unreadable += batch.unreadable
        log.info("up to account %s: %d re-encrypted so far", after, total.resealed)


async def run(batch_size: int) -> int:
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"reseal_tokens: {exc}", file=sys.stderr)
        return 2
    store = create_store(config)
    if isinstance(store, MemoryStore):
        print("reseal_tokens: MONGODB_URI is not set; the in-memory store keeps nothing "
              "across restarts, so there is nothing to re-encrypt", file=sys.stderr)
        return 2
    try:
        total = await reseal_all(store, batch_size)
    except GatewayError as exc:
        print(f"reseal_tokens: {exc.technical_message or exc.message}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    print(f"re-encrypted {total.resealed}, already current or without tokens "
          f"{total.current}, rewritten meanwhile by the gateway {total.changed}, "
          f"unreadable {len(total.unreadable)}")
    if total.unreadable:
        print("no configured key opens the tokens of these accounts (reconnect them): "
              + ", ".join(total.unreadable))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/reseal_tokens.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=BATCH,
                        help=f"accounts per batch (default {BATCH})")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    configure_logging()
    return asyncio.run(run(args.batch_size))


if __name__ == "__main__":
    sys.exit(main())
