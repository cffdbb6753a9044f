"""MongoDB with many accounts: ``python -m bench.mongo_scale``.

Loads ``--baseline`` accounts (default 10,000) into a SecantusDB server process
(the wire-protocol MongoDB the tests use), measures, grows the collection to
``--accounts`` (default 100,000) and measures again, so every figure is printed
beside the same run's baseline at a tenth of the size:

* the background queries' plans (``explain`` with ``executionStats``): the
  refresher's round (the keep-warm question, the keep-all one, the expiry sweep's
  filter) and the profile filler's (its claim, its pending count): the winning plan
  must be an IXSCAN of the query's own index, and the documents examined must
  follow what the query selects (recently used, pending), not the collection;
* the memory of one round (``tracemalloc`` peak of this process, the gateway's
  side): ``Refresher.run_once`` and ``ProfileFiller.run_once`` against the store,
  TikTok answered in process (``bench.own_work.InstantTikTok``). A round takes at
  most its batch (the refresher's ``REFRESH_MAX_PER_MINUTE``, the filler's 200),
  so its memory must not grow with the collection.

The accounts are written as ``MongoStore.save_account_tokens`` writes them (tokens
sealed with the store's key, so a round can open and refresh them), in bulk. The
mix, per size: 95 % connected, 4 % needing reauthorization, 1 % revoked; 10 % used
in the last hour (their access tokens expire within the next two hours), 20 %
earlier; 1 % with a refresh token expired and not yet swept; 1 % with a profile
pending and due, 0.5 % pending and due later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
from bson import ObjectId

from bench.common import secantus_server
from bench.own_work import InstantTikTok
from services.accounts import AccountService
from services.profile_filler import ProfileFiller
from services.refresher import (
    DEFAULT_AHEAD_SECONDS,
    DEFAULT_KEEP_WARM_SECONDS,
    DEFAULT_MAX_PER_MINUTE,
    Refresher,
)
from services.tiktok import TikTokClient
from storage.base import PLATFORM, AccountStatus, TokenGrant
from storage.crypto import TokenCipher
from storage.mongodb import (
    ACCOUNTS_COLLECTION,
    PROFILE_FILL_INDEX,
    REFRESH_DUE_INDEX,
    REFRESH_EXPIRY_INDEX,
    TOKEN_VERSION_FIELD,
    MongoStore,
    connect_mongo,
    expired_refresh_query,
)
from storage.tokens import TokenSealer

INSERT_BATCH = 5000
MB = 2**20


def account_documents(
    count: int, start: int, now: datetime, sealer: TokenSealer, rng: random.Random
) -> list[dict[str, Any]]:
    """``count`` account documents as the store writes them, numbered from ``start``."""
    documents = []
    for n in range(start, start + count):
        owner, open_id = f"owner-{n}", f"open-id-{n:08d}"
        connected = now - timedelta(days=rng.uniform(0, 180))
        refresh_expires = connected + timedelta(days=180)
        draw = rng.random()
        if draw < 0.10:  # used in the last hour: kept warm
            used = now - timedelta(minutes=rng.uniform(0, 59))
            access_expires = now + timedelta(minutes=rng.uniform(-30, 120))
        elif draw < 0.30:
            used = now - timedelta(days=rng.uniform(1, 30))
            access_expires = used + timedelta(hours=2)
        else:
            used, access_expires = None, connected + timedelta(hours=2)
        if rng.random() < 0.01:  # expired, the sweep has yet to mark it
            refresh_expires = now - timedelta(minutes=rng.uniform(0, 30))
        grant = TokenGrant(
            open_id=open_id, access_token=f"act.bench-{n}", refresh_token=f"rft.bench-{n}",
            access_token_expires_at=access_expires, refresh_token_expires_at=refresh_expires,
            scopes=["user.info.basic"],
        )
        status = rng.choices([AccountStatus.CONNECTED, AccountStatus.REAUTHORIZATION_REQUIRED,
                              AccountStatus.REVOKED], [95, 4, 1])[0]
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "ownerId": owner, "platform": PLATFORM, "platformAccountId": open_id,
            "createdAt": connected, "updatedAt": connected, "connectedAt": connected,
            "scopes": list(grant.scopes), "status": status.value, TOKEN_VERSION_FIELD: 1,
            "profilePending": False,
        }
        # A loaded profile as save_account_profile stores it (TikTok's avatar URLs are
        # long signed CDN links).
        profile = {
            "open_id": open_id, "union_id": f"union-{n:08d}", "display_name": f"Creator {n}",
            "avatar_url": f"https://p16-sign.tiktokcdn.example/{n:08d}~c5_168x168.jpeg?"
                          + "x" * 120,
        }
        doc |= {"profile": profile, "unionId": profile["union_id"],
                "displayName": profile["display_name"], "avatarUrl": profile["avatar_url"]}
        if status is AccountStatus.CONNECTED:
            doc |= sealer.seal(owner, grant)
        if used is not None:
            doc["tokenUsedAt"] = used
        pending = rng.random()
        if pending < 0.015:
            doc["profilePending"] = True
            doc["profileRetryAt"] = now - timedelta(minutes=rng.uniform(1, 600)) if (
                pending < 0.01) else now + timedelta(minutes=rng.uniform(1, 600))
        documents.append(doc)
    return documents


def plan_stages(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage of an explain's winning plan, outermost first (tests use it too)."""
    stages: list[dict[str, Any]] = []
    stage: dict[str, Any] | None = plan
    while stage:
        stages.append(stage)
        stage = stage.get("inputStage")
    return stages


async def explained(cursor: Any) -> dict[str, Any]:
    result = await cursor.explain()
    stages = plan_stages(result["queryPlanner"]["winningPlan"])
    stats = result.get("executionStats", {})
    return {
        "stages": [s["stage"] for s in stages],
        "index": stages[-1].get("indexName") if stages[-1]["stage"] == "IXSCAN" else None,
        "keys_examined": stats.get("totalKeysExamined"),
        "docs_examined": stats.get("totalDocsExamined"),
        "returned": stats.get("nReturned"),
    }


async def queries(store: MongoStore, now: datetime) -> dict[str, dict[str, Any]]:
    """Each background query's plan and its work, and how many documents it selects."""
    accounts = store.database[ACCOUNTS_COLLECTION]
    ahead = now + timedelta(seconds=DEFAULT_AHEAD_SECONDS)
    warm_since = now - timedelta(seconds=DEFAULT_KEEP_WARM_SECONDS)
    checks: dict[str, tuple[Any, str, dict[str, Any]]] = {
        "refresher: keep-warm round (default)": (
            store.due_for_refresh_cursor(ahead, limit=300, now=now, used_since=warm_since),
            REFRESH_DUE_INDEX,
            {"status": "connected", "tokenUsedAt": {"$gte": warm_since},
             "accessTokenExpiresAt": {"$lt": ahead}},
        ),
        "refresher: keep-all round": (
            store.due_for_refresh_cursor(ahead, limit=300, now=now),
            REFRESH_DUE_INDEX,
            {"status": "connected", "accessTokenExpiresAt": {"$lt": ahead}},
        ),
        "refresher: expiry sweep": (
            accounts.find(expired_refresh_query(now)), REFRESH_EXPIRY_INDEX,
            expired_refresh_query(now),
        ),
        "filler: claim (oldest due first)": (
            store.profile_fill_cursor(now), PROFILE_FILL_INDEX,
            {"profilePending": True, "status": "connected", "profileRetryAt": {"$lte": now}},
        ),
        "filler: pending count": (
            accounts.find({"profilePending": True, "status": "connected"}), PROFILE_FILL_INDEX,
            {"profilePending": True, "status": "connected"},
        ),
    }
    results = {}
    for name, (cursor, index, selection) in checks.items():
        figures = await explained(cursor)
        figures["expected_index"] = index
        figures["selected"] = await accounts.count_documents(selection)
        figures["uses_its_index"] = figures["index"] == index and "COLLSCAN" not in (
            figures["stages"])
        results[name] = figures
    return results


async def round_memory(run: Callable[[], Any]) -> tuple[float, Any, float]:
    """Peak Python memory (MB) this process allocated during ``run()``, its answer,
    and how long it took."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    answer = await run()
    took = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    return peak / MB, answer, took


async def measure(store: MongoStore, now: datetime, round_batch: int) -> dict[str, Any]:
    tiktok = TikTokClient(
        InstantTikTok(force_instance=True), client_key="bench",
        client_secret="bench-secret",  # noqa: S106 - a fake TikTok's
        redirect_uri="https://gateway.example/oauth/tiktok/callback",
        api_base_url="https://tiktok.example", authorize_url="https://tiktok.example/auth",
        connect_timeout=2.0, request_timeout=4.0,
    )
    fake_now = [0.0]

    async def no_wait(seconds: float) -> None:
        fake_now[0] += seconds  # the pace is the real one's; its waits cost nothing here

    accounts = AccountService(store=store, tiktok=tiktok,
                              refresh_skew_seconds=DEFAULT_AHEAD_SECONDS)
    collection = store.database[ACCOUNTS_COLLECTION]
    result: dict[str, Any] = {"count": await collection.count_documents({})}
    result["queries"] = await queries(store, now)

    async def round_queries() -> int:
        # A round's store calls, as Refresher.run_once makes them, with its full batch.
        await store.expire_refresh_tokens(now=now)
        due = await store.accounts_due_for_refresh(
            now + timedelta(seconds=DEFAULT_AHEAD_SECONDS), limit=DEFAULT_MAX_PER_MINUTE,
            now=now, used_since=now - timedelta(seconds=DEFAULT_KEEP_WARM_SECONDS))
        return len(due)

    peak, loaded, took = await round_memory(round_queries)
    result["round_queries"] = {"peak_mb": round(peak, 2), "seconds": round(took, 1),
                               "accounts_loaded": loaded}
    refresher = Refresher(store=store, accounts=accounts, batch_size=round_batch,
                          clock=lambda: now, monotonic=lambda: fake_now[0], sleep=no_wait)
    peak, summary, took = await round_memory(refresher.run_once)
    result["refresher_round"] = {"peak_mb": round(peak, 2), "seconds": round(took, 1),
                                 "outcomes": dict(summary.outcomes)}
    filler = ProfileFiller(store=store, tiktok=tiktok, batch_size=round_batch,
                           clock=lambda: now, sleep=no_wait)
    peak, fill, took = await round_memory(filler.run_once)
    result["filler_round"] = {"peak_mb": round(peak, 2), "seconds": round(took, 1),
                              "outcomes": dict(fill.outcomes)}
    tiktok.close()
    return result


async def run(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    cipher = TokenCipher.ephemeral()
    # SecantusDB, a pure-Python server, takes seconds per query at 100,000 documents.
    client, database = connect_mongo(uri, f"bench_{uuid.uuid4().hex[:12]}", driver=args.driver,
                                     socket_timeout_ms=120_000)
    store = MongoStore(database, cipher, client=client)
    await store.initialize()
    sealer = TokenSealer(cipher)
    rng = random.Random(14)  # noqa: S311 - a reproducible data set, not a secret
    now = datetime.now(UTC).replace(microsecond=0)
    collection = database[ACCOUNTS_COLLECTION]
    sizes: dict[str, Any] = {}
    loaded = 0
    try:
        for size in (args.baseline, args.accounts):
            started = time.monotonic()
            while loaded < size:
                batch = min(INSERT_BATCH, size - loaded)
                documents = account_documents(batch, loaded, now, sealer, rng)
                sizes.setdefault("bson_bytes_per_account", round(
                    sum(len(bson.encode(doc)) for doc in documents) / len(documents)))
                await collection.insert_many(documents, ordered=False)
                loaded += batch
            print(f"  {size:,} accounts stored ({time.monotonic() - started:.0f}s)", flush=True)
            sizes[str(size)] = await measure(store, now, args.round_batch)
    finally:
        await store.close()
    bson_bytes = sizes.pop("bson_bytes_per_account")
    return {"driver": args.driver, "round_batch": args.round_batch,
            "bson_bytes_per_account": bson_bytes, "sizes": sizes}


def print_report(report: dict[str, Any]) -> None:
    small, large = list(report["sizes"].values())
    ratio = large["count"] / small["count"]
    print(f"MongoDB (SecantusDB) with {large['count']:,} accounts beside the baseline of "
          f"{small['count']:,} (x{ratio:g}); an account document is "
          f"{report['bson_bytes_per_account']:,} bytes of BSON on average:")
    for name, big in large["queries"].items():
        base = small["queries"][name]
        grew = (big["docs_examined"] or 0) / max(base["docs_examined"] or 0, 1)
        print(f"  {name:<36} {' > '.join(big['stages'])} of {big['index']} "
              f"({'its index' if big['uses_its_index'] else 'NOT its index'}); docs examined "
              f"{base['docs_examined']:,} -> {big['docs_examined']:,} (x{grew:.1f}), selected "
              f"{base['selected']:,} -> {big['selected']:,}, returned {big['returned']:,}")
    rounds = {
        "round_queries": "refresher round's queries (batch 300)",
        "refresher_round": f"refresher round (batch {report['round_batch']})",
        "filler_round": f"filler round (batch {report['round_batch']})",
    }
    for name, label in rounds.items():
        a, b = small[name], large[name]
        what = (f"{a['accounts_loaded']} -> {b['accounts_loaded']} accounts loaded"
                if "accounts_loaded" in a else f"{a['outcomes']} -> {b['outcomes']}")
        print(f"  {label:<36} peak memory {a['peak_mb']:.2f} -> {b['peak_mb']:.2f} MB "
              f"(x{b['peak_mb'] / max(a['peak_mb'], 1e-9):.2f}); {a['seconds']} s -> "
              f"{b['seconds']} s; {what}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mongo_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--driver", choices=("pymongo", "motor"), default="pymongo")
    parser.add_argument("--round-batch", type=int, default=5,
                        help="accounts a measured round refreshes or fills (SecantusDB takes "
                        "seconds per write at 100,000 documents)")
    parser.add_argument("--quick", action="store_true",
                        help="6,000 then 18,000 accounts (a round's batch is full at both)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.quick:
        args.baseline, args.accounts = 6000, 18_000
    if not 0 < args.baseline < args.accounts:
        parser.error("--baseline must be above 0 and below --accounts")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    with secantus_server("bench-mongo-scale-") as uri:
        report = asyncio.run(run(args, uri))
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
