"""Key rotation's last step: ``scripts/reseal_tokens.py`` and ``Store.reseal_tokens``.

Tokens are stored under an old key, then re-encrypted by a store that knows the new
key (first) and the old one; afterwards a store with the new key alone reads them
all. Over the real MongoDB wire protocol (SecantusDB) with both drivers, and the
command itself as a child process, as an operator runs it.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from scripts.reseal_tokens import reseal_all
from storage.base import ResealBatch, Store, TokenGrant
from storage.crypto import TokenCipher
from storage.memory import MemoryStore
from storage.mongodb import ACCOUNTS_COLLECTION
from tests.fixtures_mongo import open_mongo_store
from tests.processes import ROOT, GatewayProcess
from tests.support import fake_grant

gen_test = pytest.mark.gen_test(timeout=60)
SCRIPT = ROOT / "scripts" / "reseal_tokens.py"


def new_key(kid: str) -> str:
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


OLD, NEW, OTHER = new_key("old"), new_key("new"), new_key("other")


def cipher(*keys: str) -> TokenCipher:
    return TokenCipher(TokenCipher.parse_keys(",".join(keys)))


async def seed(store: Store) -> dict[str, TokenGrant]:
    """Three accounts with tokens and one disconnected (no tokens): id -> its grant."""
    saved = {}
    for n in range(3):
        granted = fake_grant(f"open-id-{n}")
        account = await store.save_account_tokens(f"owner-{n}", granted, now=datetime.now(UTC))
        saved[account.id] = granted
    gone = await store.save_account_tokens(
        "owner-gone", fake_grant("open-id-9"), now=datetime.now(UTC)
    )
    await store.revoke_account(gone.id, now=datetime.now(UTC), reason="disconnected",
                               revoked_at_tiktok=True)
    return saved


async def assert_tokens(store: Store, saved: dict[str, TokenGrant]) -> None:
    for account_id, expected in saved.items():
        tokens = await store.get_account_tokens(account_id)
        assert tokens is not None
        assert (tokens.access_token, tokens.refresh_token) == (
            expected.access_token, expected.refresh_token)


def totals(batch: ResealBatch) -> tuple[int, int, int, int]:
    return batch.resealed, batch.current, batch.changed, len(batch.unreadable)


@gen_test
async def test_rotation_re_encrypts_every_token_and_a_second_run_changes_nothing(
    mongo_server, mongo_database_name, mongo_driver
):
    def opened(*keys: str) -> Any:
        return open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver,
                                cipher(*keys))

    async with opened(OLD) as store:
        saved = await seed(store)
        versions = {i: (await store.get_account_tokens(i)).version for i in saved}
    async with opened(NEW, OLD) as store:
        # Batches of 2 over 4 accounts: the id order carries from one batch to the next.
        assert totals(await reseal_all(store, batch_size=2)) == (3, 1, 0, 0)
        assert totals(await reseal_all(store, batch_size=2)) == (0, 4, 0, 0)
    async with opened(NEW) as store:  # the old key dropped: everything still opens
        await assert_tokens(store, saved)
        # The same tokens, encrypted again: not a new generation (a refresh that read
        # them meanwhile still stores its answer).
        assert {i: (await store.get_account_tokens(i)).version for i in saved} == versions


@gen_test
async def test_a_refresh_meanwhile_wins_over_the_reseal(
    mongo_server, mongo_database_name, mongo_driver
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver,
                                cipher(OLD)) as store:
        saved = await seed(store)
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver,
                                cipher(NEW, OLD)) as store:
        account_id = next(iter(saved))
        read = await store.database[ACCOUNTS_COLLECTION].find_one({"_id": ObjectId(account_id)})
        # The gateway stores new tokens for the account between the read and the write.
        saved[account_id] = fake_grant("open-id-0")
        await store.save_account_tokens("owner-0", saved[account_id], now=datetime.now(UTC))
        batch = ResealBatch(last_id=None)
        await store._reseal_one(read, batch)
        assert totals(batch) == (0, 0, 1, 0)
        await assert_tokens(store, saved)


@gen_test
async def test_tokens_no_key_opens_are_reported_and_left_alone(
    mongo_server, mongo_database_name
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, "motor",
                                cipher(OLD)) as store:
        saved = await seed(store)
    async with open_mongo_store(mongo_server.uri, mongo_database_name, "motor",
                                cipher(OTHER)) as store:
        batch = await reseal_all(store)
        assert sorted(batch.unreadable) == sorted(saved)
        assert totals(batch) == (0, 1, 0, 3)
    async with open_mongo_store(mongo_server.uri, mongo_database_name, "motor",
                                cipher(OLD)) as store:
        await assert_tokens(store, saved)  # untouched


@gen_test
async def test_the_memory_store_has_nothing_to_re_encrypt():
    store = MemoryStore(cipher(NEW))
    saved = await seed(store)
    assert totals(await reseal_all(store, batch_size=1)) == (0, 4, 0, 0)
    await assert_tokens(store, saved)


# -- the command, as an operator runs it ---------------------------------------------


def run_script(tmp_path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = GatewayProcess(tmp_path / "unused.log", **settings).env
    return subprocess.run(  # noqa: S603 - this interpreter, our own script
        [sys.executable, str(SCRIPT), "--batch-size", "2"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )


@gen_test
async def test_the_command_rotates_and_names_what_it_cannot_open(
    tmp_path, mongo_server, mongo_database_name
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, "pymongo",
                                cipher(OLD)) as store:
        saved = await seed(store)
    mongo = {"MONGODB_URI": mongo_server.uri, "MONGODB_DATABASE": mongo_database_name}

    done = run_script(tmp_path, **mongo, TOKEN_ENCRYPTION_KEYS=f"{NEW},{OLD}")
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 3, already current or without tokens 1" in done.stdout
    assert "unreadable 0" in done.stdout
    for grant_ in saved.values():  # counts and ids only
        assert grant_.access_token not in done.stdout + done.stderr

    lost = run_script(tmp_path, **mongo, TOKEN_ENCRYPTION_KEYS=OTHER)
    assert lost.returncode == 1
    assert "unreadable 3" in lost.stdout
    assert all(account_id in lost.stdout for account_id in saved)

    async with open_mongo_store(mongo_server.uri, mongo_database_name, "pymongo",
                                cipher(NEW)) as store:
        await assert_tokens(store, saved)


def test_the_command_refuses_the_memory_store(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode == 2
    assert "MONGODB_URI is not set" in done.stderr


def test_the_command_reports_an_unreachable_mongodb(tmp_path):
    done = run_script(tmp_path, MONGODB_URI="mongodb://127.0.0.1:9/", MONGODB_TIMEOUT_MS="300")
    assert done.returncode == 2
    assert "MongoDB unreachable" in done.stderr
    assert "Traceback" not in done.stderr
