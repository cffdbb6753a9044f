"""MongoDB store: the same contract as ``storage.memory.MemoryStore``, persisted.

Works with a motor ``AsyncIOMotorDatabase`` or a pymongo ``AsyncDatabase``:
both expose the same collection API (only ``client.close()`` differs: sync in
motor, a coroutine in pymongo).

Tokens are written only as ``TokenSealer`` ciphertext. Every driver error is
turned into ``StoreUnavailable`` by ``_mongo_errors``; callers never see a
pymongo exception, and the connection URI (which may carry a password) never
reaches an error message.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from services.errors import StoreUnavailable
from storage.base import (
    PLATFORM,
    PROFILE_FIELDS,
    PROFILE_FIRST_FILL_DELAY,
    Account,
    AccountStatus,
    AccountTokens,
    ClaimOutcome,
    ClaimResult,
    PendingAuthorization,
    PendingFailure,
    PendingStatus,
    ProfileClaim,
    ResealBatch,
    Store,
    TokenGrant,
)
from storage.crypto import TokenCipher, TokenIntegrityError
from storage.tokens import TokenSealer

ACCOUNTS_COLLECTION = "social_accounts"
PENDING_COLLECTION = "oauth_states"

ACCOUNT_KEY_INDEX = "owner_platform_account_unique"
PLATFORM_ACCOUNT_INDEX = "platform_account_id"
PENDING_TTL_INDEX = "expires_at_ttl"
PROFILE_FILL_INDEX = "profile_fill_due"

APP_NAME = "tiktok-gateway"
DRIVERS = ("motor", "pymongo")

_DETAILS = {"dependency": "mongodb"}

# Account attribute -> document field, for the profile fields TikTok sends.
_PROFILE_DOCUMENT_FIELDS = {
    "union_id": "unionId",
    "display_name": "displayName",
    "avatar_url": "avatarUrl",
    "username": "username",
}

_CLAIM_REFUSALS = {
    PendingStatus.COMPLETED: ClaimResult.ALREADY_COMPLETED,
    PendingStatus.IN_PROGRESS: ClaimResult.IN_PROGRESS,
    PendingStatus.FAILED: ClaimResult.FAILED,
}

# Reconnecting clears what a revocation or a refresh lease left behind.
_REVOCATION_UNSET = {
    "revokedAt": "",
    "revocationReason": "",
    "revokedAtTikTok": "",
    "refreshLease": "",
}
_TOKEN_UNSET = {"accessToken": "", "refreshToken": "", "refreshLease": ""}
# A pending profile's schedule: when the filler is due next, who holds it, failures.
_PROFILE_FILL_UNSET = {"profileRetryAt": "", "profileHolder": "", "profileFailures": ""}
# Before this, a pending profile had no schedule: such accounts are due at once.
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


def profile_fill_query(now: datetime) -> dict[str, Any]:
    """Connected accounts whose pending profile is due at ``now``: every key is in
    PROFILE_FILL_INDEX, which also yields them in due order."""
    return {
        "profilePending": True,
        "status": AccountStatus.CONNECTED.value,
        "profileRetryAt": {"$lte": now},
    }

_P = ParamSpec("_P")
_T = TypeVar("_T")


def connect_mongo(
    uri: str,
    database: str,
    *,
    driver: str = "motor",
    server_selection_timeout_ms: int = 2000,
    connect_timeout_ms: int = 2000,
    socket_timeout_ms: int = 5000,
) -> tuple[Any, Any]:
    """Build a client and its database handle without touching the network.

    The drivers connect lazily, on the first operation, so the gateway starts
    (and reports itself degraded) while MongoDB is down. Raises ``ValueError``
    for an unknown driver or unusable connection settings; the message never
    repeats the URI.
    """
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": server_selection_timeout_ms,
        "connectTimeoutMS": connect_timeout_ms,
        # Bounds a call to a MongoDB that stalls with its connections open; without
        # it the driver waits for its next heartbeat (about 10 s) to give up.
        "socketTimeoutMS": socket_timeout_ms,
        "tz_aware": True,
        "tzinfo": UTC,
        "appname": APP_NAME,
    }
    try:
        if driver == "motor":
            from motor.motor_asyncio import AsyncIOMotorClient

            client: Any = AsyncIOMotorClient(uri, **options)
        elif driver == "pymongo":
            from pymongo import AsyncMongoClient

            client = AsyncMongoClient(uri, **options)
        else:
            raise ValueError(f"unknown MongoDB driver {driver!r}; expected one of {DRIVERS}")
    except ConfigurationError as exc:
        # pymongo's messages may quote parts of the URI: name only the kind.
        raise ValueError(f"invalid MongoDB connection settings ({type(exc).__name__})") from None
    return client, client[database]


def _unavailable(exc: PyMongoError) -> StoreUnavailable:
    name = type(exc).__name__
    if isinstance(exc, ConnectionFailure):
        technical = f"MongoDB unreachable: {name}"
    elif isinstance(exc, DuplicateKeyError):
        technical = f"MongoDB write conflict persisted after retry: {name}"
    elif isinstance(exc, OperationFailure):
        technical = f"MongoDB operation failed: {name} (code {exc.code})"
    else:
        technical = f"MongoDB error: {name}"
    return StoreUnavailable(technical_message=technical, details=dict(_DETAILS))


def _mongo_errors(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Map every driver error raised by a store method to ``StoreUnavailable``."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except PyMongoError as exc:
            raise _unavailable(exc) from exc

    return wrapper


def _object_id(account_id: str) -> ObjectId | None:
    try:
        return ObjectId(account_id)
    except (InvalidId, TypeError):
        return None


def _pending_document(pending: PendingAuthorization) -> dict[str, Any]:
    return {
        "_id": pending.jti,
        "ownerId": pending.owner_id,
        "redirectUri": pending.redirect_uri,
        "scopes": list(pending.scopes),
        "codeVerifier": pending.code_verifier,
        "status": PendingStatus(pending.status).value,
        "createdAt": pending.created_at,
        "expiresAt": pending.expires_at,
        "callbackDigest": pending.callback_digest,
        "finalRedirect": pending.final_redirect,
        "failure": _failure_document(pending.failure),
    }


def _failure_document(failure: PendingFailure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {
        "status": failure.status,
        "code": failure.code,
        "message": failure.message,
        "technicalMessage": failure.technical_message,
        "details": dict(failure.details),
        "retryAfter": failure.retry_after,
    }


def _failure_from_document(doc: Any) -> PendingFailure | None:
    if not isinstance(doc, dict):
        return None
    return PendingFailure(
        status=int(doc["status"]),
        code=doc["code"],
        message=doc["message"],
        technical_message=doc.get("technicalMessage"),
        details=dict(doc.get("details") or {}),
        retry_after=doc.get("retryAfter"),
    )


def _pending_from_document(doc: dict[str, Any]) -> PendingAuthorization:
    return PendingAuthorization(
        jti=doc["_id"],
        owner_id=doc["ownerId"],
        redirect_uri=doc["redirectUri"],
        scopes=list(doc.get("scopes") or []),
        code_verifier=doc.get("codeVerifier"),
        created_at=doc["createdAt"],
        expires_at=doc["expiresAt"],
        status=PendingStatus(doc["status"]),
        callback_digest=doc.get("callbackDigest"),
        final_redirect=doc.get("finalRedirect"),
        failure=_failure_from_document(doc.get("failure")),
    )


def _account_from_document(doc: dict[str, Any]) -> Account:
    return Account(
        id=str(doc["_id"]),
        owner_id=doc["ownerId"],
        platform_account_id=doc["platformAccountId"],
        scopes=list(doc.get("scopes") or []),
        status=AccountStatus(doc.get("status", AccountStatus.CONNECTED.value)),
        access_token_expires_at=doc.get("accessTokenExpiresAt"),
        refresh_token_expires_at=doc.get("refreshTokenExpiresAt"),
        created_at=doc["createdAt"],
        updated_at=doc["updatedAt"],
        platform=doc.get("platform", PLATFORM),
        union_id=doc.get("unionId"),
        display_name=doc.get("displayName"),
        avatar_url=doc.get("avatarUrl"),
        username=doc.get("username"),
        profile_pending=bool(doc.get("profilePending", True)),
        profile=dict(doc.get("profile") or {}),
        revoked_at=doc.get("revokedAt"),
        connected_at=doc.get("connectedAt"),
        revocation_reason=doc.get("revocationReason"),
        revoked_at_tiktok=doc.get("revokedAtTikTok"),
    )


class MongoStore(Store):
    def __init__(self, database: Any, cipher: TokenCipher, *, client: Any = None) -> None:
        self._database = database
        self._client = client if client is not None else getattr(database, "client", None)
        self._sealer = TokenSealer(cipher)
        self._accounts = database[ACCOUNTS_COLLECTION]
        self._pending = database[PENDING_COLLECTION]

    @property
    def database(self) -> Any:
        return self._database

    # -- lifecycle ------------------------------------------------------------------

    @_mongo_errors
    async def initialize(self) -> None:
        await self._accounts.create_index(
            [("ownerId", ASCENDING), ("platform", ASCENDING), ("platformAccountId", ASCENDING)],
            unique=True,
            name=ACCOUNT_KEY_INDEX,
        )
        # Webhooks name the account by open_id only.
        await self._accounts.create_index(
            [("platformAccountId", ASCENDING)], name=PLATFORM_ACCOUNT_INDEX
        )
        # Housekeeping only: claim_pending checks expiry itself, since the TTL
        # monitor deletes late (once a minute on mongod).
        await self._pending.create_index(
            [("expiresAt", ASCENDING)], expireAfterSeconds=0, name=PENDING_TTL_INDEX
        )

        # -- pending profiles (the background filler) --
        # Its claim: equality on the first two keys, range and sort on the third.
        await self._accounts.create_index(
            [("profilePending", ASCENDING), ("status", ASCENDING),
             ("profileRetryAt", ASCENDING)],
            name=PROFILE_FILL_INDEX,
        )
        # Profiles left pending before fills were scheduled: due now, first in line.
        await self._accounts.update_many(
            {"profilePending": True, "profileRetryAt": {"$exists": False}},
            {"$set": {"profileRetryAt": _LONG_AGO}},
        )

    @_mongo_errors
    async def ping(self) -> None:
        await self._database.command("ping")

    @_mongo_errors
    async def close(self) -> None:
        if self._client is None:
            return
        result = self._client.close()  # motor: sync; pymongo AsyncMongoClient: coroutine
        if inspect.isawaitable(result):
            await result

    # -- pending authorizations -------------------------------------------------

    @_mongo_errors
    async def save_pending(self, pending: PendingAuthorization) -> None:
        await self._pending.replace_one(
            {"_id": pending.jti}, _pending_document(pending), upsert=True
        )

    @_mongo_errors
    async def claim_pending(self, jti: str, *, callback_digest: str, now: datetime) -> ClaimOutcome:
        claimed = await self._pending.find_one_and_update(
            {"_id": jti, "status": PendingStatus.PENDING.value, "expiresAt": {"$gt": now}},
            {
                "$set": {
                    "status": PendingStatus.IN_PROGRESS.value,
                    "callbackDigest": callback_digest,
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        if claimed is not None:
            return ClaimOutcome(ClaimResult.CLAIMED, _pending_from_document(claimed))
        # Not ours: say why, in the same order of precedence as MemoryStore.
        doc = await self._pending.find_one({"_id": jti})
        if doc is None:
            return ClaimOutcome(ClaimResult.UNKNOWN)
        pending = _pending_from_document(doc)
        if pending.status in _CLAIM_REFUSALS:
            return ClaimOutcome(_CLAIM_REFUSALS[pending.status], pending)
        if pending.expires_at <= now:
            return ClaimOutcome(ClaimResult.EXPIRED, pending)
        # Still pending and live, yet the conditional update missed it: it was
        # re-saved between our two reads. Someone else is working on it.
        return ClaimOutcome(ClaimResult.IN_PROGRESS, pending)

    @_mongo_errors
    async def finish_pending(
        self,
        jti: str,
        *,
        status: PendingStatus,
        final_redirect: str | None = None,
        failure: PendingFailure | None = None,
    ) -> None:
        await self._pending.update_one(
            {"_id": jti},
            {
                "$set": {
                    "status": PendingStatus(status).value,
                    "finalRedirect": final_redirect,
                    "failure": _failure_document(failure),
                },
                # Only the outcome is needed from here on.
                "$unset": {"codeVerifier": ""},
            },
        )

    @_mongo_errors
    async def get_pending(self, jti: str) -> PendingAuthorization | None:
        doc = await self._pending.find_one({"_id": jti})
        return _pending_from_document(doc) if doc is not None else None

    # -- accounts -----------------------------------------------------------------

    @_mongo_errors
    async def save_account_tokens(
        self, owner_id: str, grant: TokenGrant, *, now: datetime
    ) -> Account:
        natural_key = {
            "ownerId": owner_id,
            "platform": PLATFORM,
            "platformAccountId": grant.open_id,
        }
        update = {
            "$set": {
                **self._sealer.seal(owner_id, grant),
                "scopes": list(grant.scopes),
                "status": AccountStatus.CONNECTED.value,
                "updatedAt": now,
                "connectedAt": now,
            },
            "$unset": _REVOCATION_UNSET,
            "$setOnInsert": {**natural_key, "createdAt": now, "profilePending": True},
        }
        update["$setOnInsert"]["profileRetryAt"] = now + PROFILE_FIRST_FILL_DELAY
        for attempt in (1, 2):
            try:
                doc = await self._accounts.find_one_and_update(
                    natural_key, update, upsert=True, return_document=ReturnDocument.AFTER
                )
            except DuplicateKeyError:
                # Two upserts of a new key raced: the loser retries once and
                # then finds the winner's document. A second failure is mapped
                # to StoreUnavailable by the decorator.
                if attempt == 2:
                    raise
                continue
            if doc is None:
                # An upsert with returnDocument=AFTER always yields a document
                # on mongod; SecantusDB answers null when a racing upsert turned
                # into an update of the winner's document (the write did land).
                doc = await self._accounts.find_one(natural_key)
            if doc is None:
                break
            return _account_from_document(doc)
        raise StoreUnavailable(
            technical_message="MongoDB upsert returned no account document",
            details=dict(_DETAILS),
        )

    @_mongo_errors
    async def save_account_profile(
        self, account_id: str, profile: dict[str, Any], *, now: datetime
    ) -> Account:
        object_id = _object_id(account_id)
        if object_id is None:
            raise KeyError(account_id)  # as MemoryStore does for an unknown id
        fields: dict[str, Any] = {}
        for tiktok_field, attribute in PROFILE_FIELDS.items():
            if tiktok_field in profile:
                fields[_PROFILE_DOCUMENT_FIELDS[attribute]] = profile[tiktok_field]
        fields.update({"profile": dict(profile), "profilePending": False, "updatedAt": now})
        doc = await self._accounts.find_one_and_update(
            {"_id": object_id},
            {"$set": fields, "$unset": _PROFILE_FILL_UNSET},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise KeyError(account_id)
        return _account_from_document(doc)

    @_mongo_errors
    async def schedule_profile_fill(self, account_id: str, *, at: datetime) -> None:
        object_id = _object_id(account_id)
        if object_id is not None:
            await self._accounts.update_one(
                {"_id": object_id},
                {
                    "$set": {"profilePending": True, "profileRetryAt": at},
                    "$unset": {"profileHolder": "", "profileFailures": ""},
                },
            )

    @_mongo_errors
    async def claim_profile_fill(
        self, holder: str, *, now: datetime, until: datetime
    ) -> ProfileClaim | None:
        doc = await self._accounts.find_one_and_update(
            profile_fill_query(now),
            {"$set": {"profileRetryAt": until, "profileHolder": holder}},
            sort=[("profileRetryAt", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        return ProfileClaim(_account_from_document(doc), int(doc.get("profileFailures") or 0))

    def profile_fill_cursor(self, now: datetime) -> Any:
        """The claim's query as a cursor, for ``explain`` (it must use its index)."""
        return (
            self._accounts.find(profile_fill_query(now))
            .sort([("profileRetryAt", ASCENDING)])
            .limit(1)
        )

    @_mongo_errors
    async def defer_profile_fill(
        self, account_id: str, holder: str, *, retry_at: datetime
    ) -> None:
        object_id = _object_id(account_id)
        if object_id is not None:
            await self._accounts.update_one(
                {"_id": object_id, "profilePending": True, "profileHolder": holder},
                {
                    "$set": {"profileRetryAt": retry_at},
                    "$unset": {"profileHolder": ""},
                    "$inc": {"profileFailures": 1},
                },
            )

    @_mongo_errors
    async def count_pending_profiles(self) -> int:
        return int(await self._accounts.count_documents(
            {"profilePending": True, "status": AccountStatus.CONNECTED.value}
        ))

    @_mongo_errors
    async def get_account(self, account_id: str) -> Account | None:
        doc = await self._find_account(account_id)
        return _account_from_document(doc) if doc is not None else None

    @_mongo_errors
    async def list_accounts(self, owner_id: str) -> list[Account]:
        cursor = self._accounts.find({"ownerId": owner_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]
        )
        return [_account_from_document(doc) async for doc in cursor]

    @_mongo_errors
    async def get_account_tokens(self, account_id: str) -> AccountTokens | None:
        doc = await self._find_account(account_id)
        if doc is None:
            return None
        return self._sealer.open(doc["ownerId"], doc["platformAccountId"], doc)

    async def _find_account(self, account_id: str) -> dict[str, Any] | None:
        object_id = _object_id(account_id)
        if object_id is None:
            return None
        doc: dict[str, Any] | None = await self._accounts.find_one({"_id": object_id})
        return doc

    # -- token lifecycle ----------------------------------------------------------

    @_mongo_errors
    async def acquire_refresh_lease(
        self, account_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        claimed = await self._accounts.find_one_and_update(
            {
                "_id": object_id,
                "status": AccountStatus.CONNECTED.value,
                "$or": [
                    {"refreshLease": {"$exists": False}},
                    {"refreshLease.expiresAt": {"$lte": now}},
                ],
            },
            {"$set": {"refreshLease": {"holder": holder, "expiresAt": until}}},
            projection={"_id": 1},
        )
        return claimed is not None

    @_mongo_errors
    async def release_refresh_lease(self, account_id: str, holder: str) -> None:
        object_id = _object_id(account_id)
        if object_id is not None:
            await self._accounts.update_one(
                {"_id": object_id, "refreshLease.holder": holder},
                {"$unset": {"refreshLease": ""}},
            )

    @_mongo_errors
    async def save_refreshed_tokens(
        self, account_id: str, holder: str, grant: TokenGrant, *, now: datetime
    ) -> bool:
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        doc = await self._accounts.find_one({"_id": object_id}, projection={"ownerId": 1})
        if doc is None:
            return False
        fields: dict[str, Any] = {**self._sealer.seal(doc["ownerId"], grant), "updatedAt": now}
        if grant.scopes:
            fields["scopes"] = list(grant.scopes)
        result = await self._accounts.update_one(
            {"_id": object_id, "refreshLease.holder": holder},
            {"$set": fields, "$unset": {"refreshLease": ""}},
        )
        return result.modified_count == 1

    @_mongo_errors
    async def require_reauthorization(self, account_id: str, *, now: datetime) -> None:
        object_id = _object_id(account_id)
        if object_id is None:
            return
        await self._accounts.update_one(
            {"_id": object_id, "status": {"$ne": AccountStatus.REVOKED.value}},
            {
                "$set": {
                    "status": AccountStatus.REAUTHORIZATION_REQUIRED.value,
                    "updatedAt": now,
                },
                "$unset": _TOKEN_UNSET,
            },
        )

    @_mongo_errors
    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
    ) -> Account | None:
        object_id = _object_id(account_id)
        if object_id is None:
            return None
        await self._accounts.update_one(
            {"_id": object_id, "status": {"$ne": AccountStatus.REVOKED.value}},
            self._revocation(now, reason, revoked_at_tiktok),
        )
        doc = await self._accounts.find_one({"_id": object_id})
        return _account_from_document(doc) if doc is not None else None

    @_mongo_errors
    async def revoke_accounts_by_open_id(
        self,
        open_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        connected_before: datetime | None = None,
    ) -> int:
        query: dict[str, Any] = {
            "platformAccountId": open_id,
            "status": {"$ne": AccountStatus.REVOKED.value},
        }
        if connected_before is not None:
            query["$or"] = [
                {"connectedAt": {"$lt": connected_before}},
                {"connectedAt": {"$exists": False}},
            ]
        result = await self._accounts.update_many(query, self._revocation(now, reason, True))
        return int(result.modified_count)

    @_mongo_errors
    async def accounts_due_for_refresh(self, before: datetime, *, limit: int) -> list[Account]:
        cursor = (
            self._accounts.find(
                {
                    "status": AccountStatus.CONNECTED.value,
                    "accessTokenExpiresAt": {"$lt": before},
                }
            )
            .sort([("accessTokenExpiresAt", ASCENDING)])
            .limit(limit)
        )
        return [_account_from_document(doc) async for doc in cursor]

    @_mongo_errors
    async def reseal_tokens(self, *, after: str | None, limit: int) -> ResealBatch:
        query: dict[str, Any] = {}
        if after is not None:
            start = _object_id(after)
            if start is None:
                raise ValueError(f"not an account id: {after!r}")
            query["_id"] = {"$gt": start}
        fields = dict.fromkeys(("ownerId", "platformAccountId", "accessToken", "refreshToken",
                                "accessTokenExpiresAt", "refreshTokenExpiresAt"), 1)
        cursor = self._accounts.find(query, fields).sort([("_id", ASCENDING)]).limit(limit)
        documents = [doc async for doc in cursor]
        batch = ResealBatch(last_id=str(documents[-1]["_id"]) if documents else None)
        for doc in documents:
            await self._reseal_one(doc, batch)
        return batch

    async def _reseal_one(self, doc: dict[str, Any], batch: ResealBatch) -> None:
        try:
            fresh = self._sealer.reseal(doc["ownerId"], doc["platformAccountId"], doc)
        except TokenIntegrityError:
            batch.unreadable.append(str(doc["_id"]))
            return
        if fresh is None:
            batch.current += 1
            return
        # Only over the ciphertext that was read: a refresh or a disconnect meanwhile wins.
        result = await self._accounts.update_one(
            {"_id": doc["_id"], "accessToken": doc["accessToken"],
             "refreshToken": doc["refreshToken"]},
            {"$set": fresh},
        )
        if result.matched_count:
            batch.resealed += 1
        else:
            batch.changed += 1

    @staticmethod
    def _revocation(
        now: datetime, reason: int | str | None, revoked_at_tiktok: bool | None
    ) -> dict[str, Any]:
        return {
            "$set": {
                "status": AccountStatus.REVOKED.value,
                "revokedAt": now,
                "revocationReason": reason,
                "revokedAtTikTok": revoked_at_tiktok,
                "updatedAt": now,
            },
            "$unset": _TOKEN_UNSET,
        }
