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
import heapq
import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
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

from core.errors import StoreSetupFailed, StoreUnavailable
from storage.base import (
    CALL_BUDGETS,
    DEFAULT_EVENTS_RETENTION_SECONDS,
    PLATFORM,
    PROFILE_FIRST_FILL_DELAY,
    TOKEN_USE_RESOLUTION,
    Account,
    AccountStatus,
    AccountTokens,
    CallAdmission,
    CallRule,
    ClaimOutcome,
    ClaimResult,
    EventFactory,
    EventStatus,
    PendingAuthorization,
    PendingFailure,
    PendingStatus,
    ProfileClaim,
    ResealBatch,
    Store,
    StoredEvent,
    TokenGrant,
    build_event,
    check_event,
    check_event_condition,
    claim_refusal,
    epoch_ms,
    event_time,
    profile_attributes,
    window_ms,
)
from storage.crypto import TokenCipher, TokenIntegrityError
from storage.tokens import TOKEN_VERSION_FIELD, TokenSealer


def _ascending(*fields: str) -> list[tuple[str, int]]:
    """An index key: ``fields`` in order, each ascending (every index here is)."""
    return [(name, ASCENDING) for name in fields]


ACCOUNTS_COLLECTION = "social_accounts"
PENDING_COLLECTION = "oauth_states"

ACCOUNT_KEY_INDEX = "owner_platform_account_unique"
PLATFORM_ACCOUNT_INDEX = "platform_account_id"
PENDING_TTL_INDEX = "expires_at_ttl"
# accounts_due_for_refresh: the refresher's question every round.
REFRESH_DUE_INDEX = "status_token_used_access_expiry"
REFRESH_DUE_KEYS = _ascending("status", "tokenUsedAt", "accessTokenExpiresAt")
# expire_refresh_tokens: connected accounts whose refresh token has expired.
REFRESH_EXPIRY_INDEX = "status_refresh_expiry"
REFRESH_EXPIRY_KEYS = _ascending("status", "refreshTokenExpiresAt")
# record_expiry_notices: connected accounts without a notice whose refresh token expires soon.
EXPIRY_NOTICE_INDEX = "status_notice_refresh_expiry"
EXPIRY_NOTICE_KEYS = _ascending("status", "expiryNoticeFor", "refreshTokenExpiresAt")

# The filler's claim: equality on the first two keys, range and sort on the third.
PROFILE_FILL_INDEX = "profile_fill_due"
PROFILE_FILL_KEYS = _ascending("profilePending", "status", "profileRetryAt")


@dataclass(frozen=True)
class IndexSpec:
    collection: str
    keys: list[tuple[str, int]]
    name: str
    options: dict[str, Any] = field(default_factory=dict)


# Every index ``MongoStore.initialize`` creates, in order; one that cannot be created
# is reported by name without stopping the others.
INDEXES: tuple[IndexSpec, ...] = (
    IndexSpec(
        ACCOUNTS_COLLECTION,
        _ascending("ownerId", "platform", "platformAccountId"),
        ACCOUNT_KEY_INDEX,
        {"unique": True},
    ),
    # Webhooks name the account by open_id only.
    IndexSpec(ACCOUNTS_COLLECTION, _ascending("platformAccountId"), PLATFORM_ACCOUNT_INDEX),
    # Led by tokenUsedAt, so a keep-warm round reads only recently used accounts,
    # however many idle ones the collection holds.
    IndexSpec(ACCOUNTS_COLLECTION, REFRESH_DUE_KEYS, REFRESH_DUE_INDEX),
    IndexSpec(ACCOUNTS_COLLECTION, REFRESH_EXPIRY_KEYS, REFRESH_EXPIRY_INDEX),
    # Pending profiles (the background filler).
    IndexSpec(ACCOUNTS_COLLECTION, PROFILE_FILL_KEYS, PROFILE_FILL_INDEX),
    IndexSpec(ACCOUNTS_COLLECTION, EXPIRY_NOTICE_KEYS, EXPIRY_NOTICE_INDEX),
    # Housekeeping only: claim_pending checks expiry itself, since the TTL
    # monitor deletes late (once a minute on mongod).
    IndexSpec(
        PENDING_COLLECTION, _ascending("expiresAt"), PENDING_TTL_INDEX,
        {"expireAfterSeconds": 0},
    ),
)

# createIndexes failures that no retry can fix. The server's own message is not
# repeated: for a duplicate key it quotes the stored values.
_INDEX_CONFLICTS = {
    68: "an index with this name already exists (IndexAlreadyExists, code 68); "
        "drop it or give it this index's keys and options",
    85: "an index on the same keys already exists under another name or with other "
        "options (IndexOptionsConflict, code 85); drop that index",
    86: "an index with this name already exists with other keys or options "
        "(IndexKeySpecsConflict, code 86); drop that index",
    11000: "documents already stored share a key this unique index forbids "
           "(DuplicateKey, code 11000); remove the duplicates",
}
# Store methods that work before the indexes exist; every other one waits for them
# when the store requires its indexes (see MongoStore).
_SETUP_METHODS = frozenset({"_create_indexes", "ping", "close"})

# Account events (issue 15).
EVENTS_COLLECTION = "account_events"
EVENT_META_COLLECTION = "event_meta"
RELAY_LEASE_ID = "relay"
EVENT_SEQ_INDEX = "seq_unique"
EVENT_DUE_INDEX = "status_next_attempt"
EVENT_STATUS_SEQ_INDEX = "status_seq"
EVENT_ACCOUNT_INDEX = "account_seq"
EVENT_TTL_INDEX = "recorded_at_ttl"
OUTBOX_INDEX = "outbox_id"
# An index of that name exists with other options (a changed EVENTS_RETENTION_DAYS):
# mongod answers 85, SecantusDB 86.
_INDEX_OPTIONS_CONFLICT = (85, 86)
# How many later due events of blocked accounts ``due_events`` looks past.
_DUE_PAGES = 3
# The event log's and the outboxes' indexes (the TTL one depends on the retention:
# MongoStore._event_ttl_index).
EVENT_INDEXES: tuple[IndexSpec, ...] = (
    IndexSpec(EVENTS_COLLECTION, _ascending("seq"), EVENT_SEQ_INDEX, {"unique": True}),
    IndexSpec(EVENTS_COLLECTION, _ascending("status", "nextAttemptAt"), EVENT_DUE_INDEX),
    IndexSpec(EVENTS_COLLECTION, _ascending("status", "seq"), EVENT_STATUS_SEQ_INDEX),
    IndexSpec(EVENTS_COLLECTION, _ascending("accountId", "seq"), EVENT_ACCOUNT_INDEX),
    IndexSpec(ACCOUNTS_COLLECTION, _ascending("outbox.id"), OUTBOX_INDEX, {"sparse": True}),
)

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

# Reconnecting clears what a revocation, a refresh lease or a backoff left behind; the
# new grant's refresh token gets its own expiry notice.
_REVOCATION_UNSET = {
    "revokedAt": "",
    "revocationReason": "",
    "revokedAtTikTok": "",
    "refreshLease": "",
    "refreshRetryAt": "",
    "refreshFailures": "",
    "expiryNoticeFor": "",
}
_TOKEN_UNSET = {"accessToken": "", "refreshToken": "", "refreshLease": ""}
_ONE_MORE_GENERATION = {"$inc": {TOKEN_VERSION_FIELD: 1}}
# A pending profile's schedule: when the filler is due next, who holds it, failures.
_PROFILE_FILL_UNSET = {"profileRetryAt": "", "profileHolder": "", "profileFailures": ""}
# Before this, a pending profile had no schedule: such accounts are due at once.
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


def _reauthorization_required(now: datetime) -> dict[str, Any]:
    """The update that leaves an account needing the user to connect again."""
    return {
        "$set": {
            "status": AccountStatus.REAUTHORIZATION_REQUIRED.value,
            "updatedAt": now,
        },
        "$unset": _TOKEN_UNSET,
    }


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
    """Map every driver error raised by a store method to ``StoreUnavailable``;
    refuse data operations while a store that requires its indexes lacks them."""
    gated = method.__name__ not in _SETUP_METHODS

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if gated:
            store: Any = args[0]
            if store.requires_indexes:
                store.raise_unless_indexed()
        try:
            return await method(*args, **kwargs)
        except PyMongoError as exc:
            raise _unavailable(exc) from exc

    return wrapper


def _generation_is(version: int) -> dict[str, Any]:
    """The query for tokens of generation ``version``; documents written before the
    counter existed have none, which is generation 0."""
    if version:
        return {TOKEN_VERSION_FIELD: version}
    return {TOKEN_VERSION_FIELD: {"$in": [None, 0]}}


# Leases (refresh, relay, delivery) are judged by MongoDB's clock ($$NOW), never a
# gateway's: two processes whose clocks disagree still agree on who holds one. Expiries
# are compared as numbers (milliseconds since the epoch): SecantusDB 0.7.0b3 compares a
# stored date with $$NOW wrongly (as equal, whatever they are), and on mongod the two
# forms agree.


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _lease(holder: str, seconds: float) -> dict[str, Any]:
    """A lease held by ``holder`` for ``seconds`` from $$NOW (in an update pipeline)."""
    return {
        "holder": {"$literal": holder},
        "expiresAt": {"$add": ["$$NOW", _milliseconds(seconds)]},
    }


def _expired(path: str) -> dict[str, Any]:
    """The lease expiry at ``path`` has passed."""
    return {"$expr": {"$lte": [{"$toLong": f"${path}"}, {"$toLong": "$$NOW"}]}}


def _lasting(path: str, seconds: float) -> dict[str, Any]:
    """The lease at ``path`` lasts at least ``seconds`` more."""
    return {
        "$expr": {
            "$gt": [
                {"$toLong": f"${path}"},
                {"$add": [{"$toLong": "$$NOW"}, _milliseconds(seconds)]},
            ]
        }
    }


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
        token_used_at=doc.get("tokenUsedAt"),
        refresh_retry_at=doc.get("refreshRetryAt"),
        refresh_failures=int(doc.get("refreshFailures") or 0),
        expiry_notice_for=doc.get("expiryNoticeFor"),
    )


def due_for_refresh_query(
    before: datetime, *, now: datetime | None = None, used_since: datetime | None = None
) -> dict[str, Any]:
    """The filter of ``accounts_due_for_refresh`` (REFRESH_DUE_INDEX serves it)."""
    query: dict[str, Any] = {"status": AccountStatus.CONNECTED.value}
    if used_since is not None:
        query["tokenUsedAt"] = {"$gte": used_since}
    query["accessTokenExpiresAt"] = {"$lt": before}
    if now is not None:
        # Matches a missing field too: no backoff.
        query["refreshRetryAt"] = {"$not": {"$gt": now}}
    return query


def expired_refresh_query(now: datetime) -> dict[str, Any]:
    """The filter of ``expire_refresh_tokens`` (REFRESH_EXPIRY_INDEX serves it)."""
    return {"status": AccountStatus.CONNECTED.value, "refreshTokenExpiresAt": {"$lte": now}}


def expiry_notice_query(now: datetime, expiring_by: datetime) -> dict[str, Any]:
    """The filter of ``record_expiry_notices`` (EXPIRY_NOTICE_INDEX serves it)."""
    return {
        "status": AccountStatus.CONNECTED.value,
        # Matches a missing field too: no notice for this grant yet.
        "expiryNoticeFor": None,
        "refreshTokenExpiresAt": {"$gt": now, "$lte": expiring_by},
    }


# What an event's account snapshot is rendered from, and the token generation: a change
# is written with its event only while the account still holds what was read.
_SNAPSHOT_FIELDS = (
    "status",
    "updatedAt",
    "scopes",
    "displayName",
    "avatarUrl",
    "username",
    "accessTokenExpiresAt",
    "refreshTokenExpiresAt",
    "expiryNoticeFor",
    TOKEN_VERSION_FIELD,
)
# Reads and conditional writes before giving up on an account that keeps changing.
_EVENT_WRITE_ATTEMPTS = 5


def _unchanged(doc: dict[str, Any]) -> dict[str, Any]:
    """The query for ``doc`` as read: same id, same snapshot fields (None also matches
    a missing field, as ``_account_from_document`` reads one)."""
    return {"_id": doc["_id"], **{name: doc.get(name) for name in _SNAPSHOT_FIELDS}}


def _stored(value: Any) -> Any:
    # BSON dates keep milliseconds: the snapshot shows what the document will hold.
    if isinstance(value, datetime):
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value


def _applied(doc: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as ``update`` ($set, $unset, $inc: what the account updates use) leaves it."""
    unknown = set(update) - {"$set", "$unset", "$inc"}
    if unknown:
        raise ValueError(f"cannot foresee {', '.join(sorted(unknown))}")
    after = dict(doc)
    after.update({name: _stored(value) for name, value in update.get("$set", {}).items()})
    for name in update.get("$unset", {}):
        after.pop(name, None)
    for name, step in update.get("$inc", {}).items():
        after[name] = (after.get(name) or 0) + step
    return after


class MongoStore(Store):
    """``require_indexes``: refuse every data operation (``StoreUnavailable``) until
    ``initialize`` has created the indexes. The gateway's store does: a unique index
    created after the first writes may find duplicates, and SecantusDB can hang when
    an index is created while the first write lands on a new collection."""

    def __init__(
        self,
        database: Any,
        cipher: TokenCipher,
        *,
        client: Any = None,
        require_indexes: bool = False,
        events_retention_seconds: int = DEFAULT_EVENTS_RETENTION_SECONDS,
    ) -> None:
        self._database = database
        self._client = client if client is not None else getattr(database, "client", None)
        self._sealer = TokenSealer(cipher)
        self._accounts = database[ACCOUNTS_COLLECTION]
        self._pending = database[PENDING_COLLECTION]
        self.requires_indexes = require_indexes
        self._indexed = False
        # Why the indexes are missing: the last failed initialize() (None: not tried yet).
        self._setup_error: StoreUnavailable | None = None
        self._events = database[EVENTS_COLLECTION]
        self._event_meta = database[EVENT_META_COLLECTION]
        self._events_retention_seconds = events_retention_seconds

    @property
    def database(self) -> Any:
        return self._database

    # -- lifecycle ------------------------------------------------------------------

    async def initialize(self) -> None:
        """Create every index of ``INDEXES``.

        Raises ``StoreSetupFailed`` naming each index that can never be created as
        asked (a conflicting index, duplicate documents), after trying all of them;
        ``StoreUnavailable`` when MongoDB cannot be reached (worth retrying).
        """
        try:
            await self._create_indexes()
        except StoreUnavailable as exc:
            self._setup_error = exc
            raise
        self._indexed = True
        self._setup_error = None

    @_mongo_errors
    async def _create_indexes(self) -> None:
        problems = []
        for spec in (*INDEXES, *EVENT_INDEXES, self._event_ttl_index()):
            try:
                await self._database[spec.collection].create_index(
                    spec.keys, name=spec.name, **spec.options
                )
            except OperationFailure as exc:
                if spec.name == EVENT_TTL_INDEX and exc.code in _INDEX_OPTIONS_CONFLICT:
                    await self._change_event_retention()
                    continue
                reason = _INDEX_CONFLICTS.get(exc.code or 0)
                if reason is None:
                    raise
                problems.append(
                    f"MongoDB index {spec.name} on {spec.collection} cannot be created: {reason}"
                )
        if problems:
            raise StoreSetupFailed(problems, details=dict(_DETAILS))
        # TikTok call budgets: their documents exist before any call is admitted.
        await self._create_call_budgets(CALL_BUDGETS)
        # Profiles left pending before fills were scheduled: due now, first in line.
        await self._accounts.update_many(
            {"profilePending": True, "profileRetryAt": {"$exists": False}},
            {"$set": {"profileRetryAt": _LONG_AGO}},
        )

    def _event_ttl_index(self) -> IndexSpec:
        """Account events are kept EVENTS_RETENTION_DAYS after the relay logged them."""
        return IndexSpec(
            EVENTS_COLLECTION, _ascending("recordedAt"), EVENT_TTL_INDEX,
            {"expireAfterSeconds": self._events_retention_seconds},
        )

    async def _change_event_retention(self) -> None:
        """EVENTS_RETENTION_DAYS changed since the TTL index was made: change the index
        (part of ``_create_indexes``, so not gated)."""
        await self._database.command(
            {
                "collMod": EVENTS_COLLECTION,
                "index": {
                    "name": EVENT_TTL_INDEX,
                    "expireAfterSeconds": self._events_retention_seconds,
                },
            }
        )

    def raise_unless_indexed(self) -> None:
        """Raise ``StoreUnavailable`` unless ``initialize`` has created the indexes."""
        if self._indexed:
            return
        if isinstance(self._setup_error, StoreSetupFailed):
            # A new exception each time: raising one instance again grows its traceback.
            raise StoreSetupFailed(self._setup_error.problems, details=dict(_DETAILS))
        last = self._setup_error.technical_message if self._setup_error else None
        raise StoreUnavailable(
            technical_message="MongoDB indexes not created yet"
            + (f" (last attempt: {last})" if last else " (start-up has not created them)"),
            details=dict(_DETAILS),
        )

    async def check_ready(self) -> None:
        if isinstance(self._setup_error, StoreSetupFailed):
            self.raise_unless_indexed()
        await self.ping()
        self.raise_unless_indexed()

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
        # No refusal (still pending and live), yet the conditional update missed it: it
        # was re-saved between our two reads. Someone else is working on it.
        return ClaimOutcome(claim_refusal(pending, now) or ClaimResult.IN_PROGRESS, pending)

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
        self,
        owner_id: str,
        grant: TokenGrant,
        *,
        now: datetime,
        event_factory: EventFactory | None = None,
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
            **_ONE_MORE_GENERATION,
        }
        update["$setOnInsert"]["profileRetryAt"] = now + PROFILE_FIRST_FILL_DELAY
        if event_factory is not None:
            return await self._save_grant_with_event(natural_key, update, event_factory)
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

    async def _save_grant_with_event(
        self, natural_key: dict[str, Any], update: dict[str, Any], event_factory: EventFactory
    ) -> Account:
        """``save_account_tokens`` with its event: an update of the account, or the insert
        of a new one, each one write holding the event. Not an upsert: the event says
        whether the account existed, and what the write leaves, before the write."""
        on_insert = update["$setOnInsert"]
        change = {name: value for name, value in update.items() if name != "$setOnInsert"}
        for _ in range(_EVENT_WRITE_ATTEMPTS):
            updated = await self._change_with_event(natural_key, change, event_factory)
            if updated is not None:
                return updated
            created = {name: _stored(value) for name, value in on_insert.items()}
            document = _applied({"_id": ObjectId(), **created}, change)
            account = _account_from_document(document)
            event = build_event(event_factory, account, None)
            if event is not None:
                document["outbox"] = [event]
            try:
                await self._accounts.insert_one(document)
            except DuplicateKeyError:
                continue  # a concurrent connection created it: update that one
            return account
        raise _kept_changing()

    async def _change_with_event(
        self, query: dict[str, Any], update: dict[str, Any], event_factory: EventFactory
    ) -> Account | None:
        """Apply ``update`` to the account ``query`` matches, pushing the factory's event
        onto its outbox in the same update; the account after the change (None: no
        account matches). The event is built from the account as read, so the update
        applies only while the account still holds that (else it is read again)."""
        for _ in range(_EVENT_WRITE_ATTEMPTS):
            doc = await self._accounts.find_one(query)
            if doc is None:
                return None
            after = _applied(doc, update)
            event = build_event(
                event_factory, _account_from_document(after), _account_from_document(doc)
            )
            write = dict(update)
            if event is not None:
                write["$push"] = {"outbox": event}
            result = await self._accounts.update_one({"$and": [query, _unchanged(doc)]}, write)
            if result.matched_count:
                return _account_from_document(after)
        raise _kept_changing()

    async def _change_each_with_event(
        self, query: dict[str, Any], update: dict[str, Any], event_factory: EventFactory
    ) -> int:
        """``_change_with_event`` for every account ``query`` matches, one by one (an
        update_many cannot give each its own event); how many changed."""
        ids = [doc["_id"] async for doc in self._accounts.find(query, projection={"_id": 1})]
        changed = 0
        for object_id in ids:
            one = {"$and": [query, {"_id": object_id}]}
            if await self._change_with_event(one, update, event_factory) is not None:
                changed += 1
        return changed

    @_mongo_errors
    async def save_account_profile(
        self, account_id: str, profile: dict[str, Any], *, now: datetime
    ) -> Account:
        object_id = _object_id(account_id)
        if object_id is None:
            raise KeyError(account_id)  # as MemoryStore does for an unknown id
        fields = {
            _PROFILE_DOCUMENT_FIELDS[attribute]: value
            for attribute, value in profile_attributes(profile).items()
        }
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
    async def acquire_refresh_lease(self, account_id: str, holder: str, *, seconds: float) -> bool:
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        # An update pipeline, so that the expiry is $$NOW + seconds on MongoDB's clock.
        claimed = await self._accounts.find_one_and_update(
            {
                "_id": object_id,
                "status": AccountStatus.CONNECTED.value,
                "$or": [
                    {"refreshLease": {"$exists": False}},
                    _expired("refreshLease.expiresAt"),
                ],
            },
            [{"$set": {"refreshLease": _lease(holder, seconds)}}],
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
        self, account_id: str, grant: TokenGrant, *, version: int, now: datetime
    ) -> bool:
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        doc = await self._accounts.find_one({"_id": object_id}, projection={"ownerId": 1})
        if doc is None:
            return False
        fields: dict[str, Any] = {
            **self._sealer.seal(doc["ownerId"], grant),
            "status": AccountStatus.CONNECTED.value,
            "updatedAt": now,
        }
        if grant.scopes:
            fields["scopes"] = list(grant.scopes)
        result = await self._accounts.update_one(
            {
                "_id": object_id,
                "status": {"$ne": AccountStatus.REVOKED.value},
                **_generation_is(version),
            },
            {"$set": fields, **_ONE_MORE_GENERATION},
        )
        return bool(result.modified_count == 1)

    @_mongo_errors
    async def require_reauthorization(
        self,
        account_id: str,
        *,
        now: datetime,
        version: int | None = None,
        event_factory: EventFactory | None = None,
    ) -> bool:
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        query: dict[str, Any] = {"_id": object_id, "status": {"$ne": AccountStatus.REVOKED.value}}
        if version is not None:
            query.update(_generation_is(version))
        update = _reauthorization_required(now)
        if event_factory is not None:
            return await self._change_with_event(query, update, event_factory) is not None
        result = await self._accounts.update_one(query, update)
        return bool(result.matched_count == 1)

    @_mongo_errors
    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
        event_factory: EventFactory | None = None,
    ) -> Account | None:
        object_id = _object_id(account_id)
        if object_id is None:
            return None
        query = {"_id": object_id, "status": {"$ne": AccountStatus.REVOKED.value}}
        update = self._revocation(now, reason, revoked_at_tiktok)
        if event_factory is not None:
            revoked = await self._change_with_event(query, update, event_factory)
            if revoked is not None:
                return revoked
        else:
            await self._accounts.update_one(query, update)
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
        event_factory: EventFactory | None = None,
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
        update = self._revocation(now, reason, True)
        if event_factory is not None:
            return await self._change_each_with_event(query, update, event_factory)
        result = await self._accounts.update_many(query, update)
        return int(result.modified_count)

    @_mongo_errors
    async def accounts_due_for_refresh(
        self,
        before: datetime,
        *,
        limit: int,
        now: datetime | None = None,
        used_since: datetime | None = None,
    ) -> list[Account]:
        cursor = self.due_for_refresh_cursor(before, limit=limit, now=now, used_since=used_since)
        return [_account_from_document(doc) async for doc in cursor]

    def due_for_refresh_cursor(
        self,
        before: datetime,
        *,
        limit: int,
        now: datetime | None = None,
        used_since: datetime | None = None,
    ) -> Any:
        """The cursor ``accounts_due_for_refresh`` reads (tests ``explain`` it)."""
        return (
            self._accounts.find(due_for_refresh_query(before, now=now, used_since=used_since))
            .sort([("accessTokenExpiresAt", ASCENDING)])
            .limit(limit)
            # Named, so the plan never depends on the planner's pick among the indexes
            # led by status (SecantusDB's planner picks none for three range clauses).
            .hint(REFRESH_DUE_INDEX)
        )

    @_mongo_errors
    async def mark_token_used(self, account_id: str, *, now: datetime) -> None:
        object_id = _object_id(account_id)
        if object_id is None:
            return
        # Matches nothing, so writes nothing, when a use was recorded less than
        # TOKEN_USE_RESOLUTION ago.
        await self._accounts.update_one(
            {"_id": object_id, "tokenUsedAt": {"$not": {"$gt": now - TOKEN_USE_RESOLUTION}}},
            {"$set": {"tokenUsedAt": now}},
        )

    @_mongo_errors
    async def defer_refresh(self, account_id: str, *, retry_at: datetime, failures: int) -> None:
        object_id = _object_id(account_id)
        if object_id is not None:
            await self._accounts.update_one(
                {"_id": object_id},
                {"$set": {"refreshRetryAt": retry_at, "refreshFailures": failures}},
            )

    @_mongo_errors
    async def clear_refresh_retry(self, account_id: str) -> None:
        object_id = _object_id(account_id)
        if object_id is not None:
            await self._accounts.update_one(
                {"_id": object_id},
                {"$unset": {"refreshRetryAt": "", "refreshFailures": ""}},
            )

    @_mongo_errors
    async def expire_refresh_tokens(
        self, *, now: datetime, event_factory: EventFactory | None = None
    ) -> int:
        update = _reauthorization_required(now)
        if event_factory is not None:
            return await self._change_each_with_event(
                expired_refresh_query(now), update, event_factory
            )
        result = await self._accounts.update_many(expired_refresh_query(now), update)
        return int(result.modified_count)

    @_mongo_errors
    async def record_expiry_notices(
        self, *, now: datetime, expiring_by: datetime, limit: int, event_factory: EventFactory
    ) -> int:
        query = expiry_notice_query(now, expiring_by)
        noticed = 0
        expiring = [doc async for doc in self.expiry_notice_cursor(now, expiring_by, limit=limit)]
        for doc in expiring:
            # Only while it still has no notice, and for the expiry read (_unchanged).
            one = {"$and": [query, {"_id": doc["_id"]}]}
            update = {"$set": {"expiryNoticeFor": doc["refreshTokenExpiresAt"]}}
            if await self._change_with_event(one, update, event_factory) is not None:
                noticed += 1
        return noticed

    def expiry_notice_cursor(self, now: datetime, expiring_by: datetime, *, limit: int) -> Any:
        """The cursor ``record_expiry_notices`` reads (tests ``explain`` it)."""
        return (
            self._accounts.find(
                expiry_notice_query(now, expiring_by),
                projection={"refreshTokenExpiresAt": 1},
            )
            .sort([("refreshTokenExpiresAt", ASCENDING)])
            .limit(limit)
            .hint(EXPIRY_NOTICE_INDEX)
        )

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

    # -- TikTok call budgets ----------------------------------------------------------
    # One document per budget: {_id: name, calls: [dates], background: [dates]}, the
    # times of the last admitted calls in admission order. One pipeline update judges
    # and records a call, so every process and machine draws from one log.

    @functools.cached_property
    def _call_budgets(self) -> Any:
        return self._database[CALL_BUDGETS_COLLECTION]

    @_mongo_errors
    async def admit_call(
        self,
        budget: str,
        *,
        limit: int,
        window_seconds: float,
        background: bool = False,
        background_limit: int | None = None,
        now: datetime | None = None,
    ) -> CallAdmission:
        if limit < 1 or (background and not background_limit):
            raise ValueError("limit and background_limit must be at least 1")
        # BSON dates are milliseconds: so is the window, rounded up.
        rule = CallRule(limit, window_ms(window_seconds), background, background_limit)
        pipeline = _admission_pipeline(now, rule)
        for _ in range(2):
            doc = await self._call_budgets.find_one_and_update(
                {"_id": budget}, pipeline, return_document=ReturnDocument.AFTER
            )
            if doc is not None:
                # The post-image holds the decision: the rule only describes it.
                return rule.judge(
                    [epoch_ms(t) for t in doc["calls"]],
                    [epoch_ms(t) for t in doc["background"]],
                    epoch_ms(doc["askedAt"]),
                    admitted=bool(doc["admitted"]),
                )
            # Not made yet (initialize has not run): make it, then ask again. Never an
            # upsert of the admission itself, whose answer may be lost in a race.
            await self._create_call_budgets((budget,))
        raise StoreUnavailable(
            technical_message=f"MongoDB call budget {budget!r} could not be created",
            details=dict(_DETAILS),
        )

    async def _create_call_budgets(self, names: tuple[str, ...]) -> None:
        for name in names:
            try:
                await self._call_budgets.update_one(
                    {"_id": name},
                    {"$setOnInsert": {"calls": [], "background": []}},
                    upsert=True,
                )
            except DuplicateKeyError:
                pass  # another process made it meanwhile

    # -- account events ---------------------------------------------------------------

    @_mongo_errors
    async def append_account_event(
        self, account_id: str, event: dict[str, Any], *, only_if: dict[str, Any] | None = None
    ) -> bool:
        check_event(event)
        conditions = check_event_condition(only_if)
        object_id = _object_id(account_id)
        if object_id is None:
            return False
        query: dict[str, Any] = {"_id": object_id}
        for attribute, expected in conditions.items():
            query[_ACCOUNT_DOCUMENT_FIELDS[attribute]] = (
                expected.value if isinstance(expected, AccountStatus) else expected
            )
        result = await self._accounts.update_one(query, {"$push": {"outbox": dict(event)}})
        return bool(result.matched_count)

    # The relay lease and the delivery claims are judged by MongoDB's clock, as the
    # refresh lease is (_expired, _lasting).

    @_mongo_errors
    async def acquire_relay_lease(self, holder: str, *, seconds: float) -> bool:
        try:
            # Upserted by the first relayer ever; seq counts from there, the document stays.
            doc = await self._event_meta.find_one_and_update(
                {"_id": RELAY_LEASE_ID, "$or": [{"holder": holder}, _expired("expiresAt")]},
                [
                    {
                        "$set": {
                            **_lease(holder, seconds),
                            "seq": {"$ifNull": ["$seq", 0]},
                        }
                    }
                ],
                upsert=True,
                projection={"holder": 1},
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False  # another process holds it: the upsert found the document taken
        if doc is None:
            # SecantusDB may answer null for an upsert that raced another and applied.
            doc = await self._event_meta.find_one({"_id": RELAY_LEASE_ID}, {"holder": 1})
        return doc is not None and doc.get("holder") == holder

    @_mongo_errors
    async def release_relay_lease(self, holder: str) -> None:
        await self._event_meta.update_one(
            {"_id": RELAY_LEASE_ID, "holder": holder}, {"$set": {"expiresAt": _EPOCH}}
        )

    @_mongo_errors
    async def relay_outbox(
        self, holder: str, *, now: datetime, fence_seconds: float, push: bool, limit: int
    ) -> list[StoredEvent]:
        # An array sort key is its smallest element: the account's oldest event first.
        cursor = (
            self._accounts.find(
                {"outbox.id": {"$exists": True}}, projection={"ownerId": 1, "outbox": 1}
            )
            .sort([("outbox.timestamp", ASCENDING)])
            .limit(limit)
        )
        queues = [[(doc, event) for event in doc["outbox"]] async for doc in cursor]
        relayed: list[StoredEvent] = []
        for doc, event in heapq.merge(*queues, key=lambda item: item[1]["timestamp"]):
            if len(relayed) >= limit:
                break
            # Fenced: only while this relayer's lease lasts beyond the fence, so a
            # relayer that lost its lease allocates nothing; the fence margin outlasts
            # the insert below, so no seq can land behind one a reader already saw.
            meta = await self._event_meta.find_one_and_update(
                {
                    "_id": RELAY_LEASE_ID,
                    "holder": holder,
                    **_lasting("expiresAt", fence_seconds),
                },
                {"$inc": {"seq": 1}},
                projection={"seq": 1},
                return_document=ReturnDocument.AFTER,
            )
            if meta is None:
                break
            document = {
                "_id": event["id"],
                "seq": int(meta["seq"]),
                "type": event["type"],
                "timestamp": event["timestamp"],
                "data": event["data"],
                "accountId": str(doc["_id"]),
                "ownerId": doc["ownerId"],
                "status": (EventStatus.PENDING if push else EventStatus.PULL_ONLY).value,
                "attempts": 0,
                "recordedAt": now,
            }
            if push:
                document["nextAttemptAt"] = now
            try:
                await self._events.insert_one(document)
                relayed.append(_event_from_document(document))
            except DuplicateKeyError:
                pass  # logged by a relayer that stopped before its $pull (a seq is skipped)
            await self._accounts.update_one(
                {"_id": doc["_id"]}, {"$pull": {"outbox": {"id": event["id"]}}}
            )
        return relayed

    @_mongo_errors
    async def list_events(
        self, *, after_seq: int, limit: int, status: EventStatus | None = None
    ) -> list[StoredEvent]:
        query: dict[str, Any] = {"seq": {"$gt": after_seq}}
        if status is not None:
            query["status"] = EventStatus(status).value
        cursor = self._events.find(query).sort([("seq", ASCENDING)]).limit(limit)
        return [_event_from_document(doc) async for doc in cursor]

    @_mongo_errors
    async def get_event(self, event_id: str) -> StoredEvent | None:
        doc = await self._events.find_one({"_id": event_id})
        return _event_from_document(doc) if doc is not None else None

    @_mongo_errors
    async def due_events(self, *, now: datetime, limit: int) -> list[StoredEvent]:
        due: list[StoredEvent] = []
        seen: set[str] = set()
        for _ in range(_DUE_PAGES):
            query: dict[str, Any] = {**_claimable(now)}
            if seen:
                query["accountId"] = {"$nin": sorted(seen)}
            cursor = self._events.find(query).sort([("seq", ASCENDING)]).limit(limit)
            page = [_event_from_document(doc) async for doc in cursor]
            for stored in page:
                if stored.account_id in seen:
                    continue
                seen.add(stored.account_id)
                # In flight, waiting for its retry or not: an earlier pending event
                # of the account goes first.
                earlier = await self._events.find_one(
                    {
                        "accountId": stored.account_id,
                        "status": EventStatus.PENDING.value,
                        "seq": {"$lt": stored.seq},
                    },
                    projection={"_id": 1},
                )
                if earlier is None:
                    due.append(stored)
            if len(due) >= limit or len(page) < limit:
                break
        return sorted(due, key=lambda stored: stored.seq)[:limit]

    @_mongo_errors
    async def claim_event_for_delivery(
        self, event_id: str, holder: str, *, now: datetime, seconds: float
    ) -> StoredEvent | None:
        doc = await self._events.find_one_and_update(
            {"_id": event_id, **_claimable(now)},
            [
                {
                    "$set": {
                        "lease": _lease(holder, seconds),
                        "firstAttemptAt": {"$ifNull": ["$firstAttemptAt", now]},
                    }
                }
            ],
            return_document=ReturnDocument.AFTER,
        )
        return _event_from_document(doc) if doc is not None else None

    @_mongo_errors
    async def mark_delivered(self, event_id: str, holder: str, *, now: datetime) -> bool:
        result = await self._events.update_one(
            {"_id": event_id, "lease.holder": holder},
            {
                "$set": {"status": EventStatus.DELIVERED.value, "deliveredAt": now},
                "$inc": {"attempts": 1},
                "$unset": {"lease": "", "nextAttemptAt": "", "lastFailure": ""},
            },
        )
        return bool(result.modified_count)

    @_mongo_errors
    async def mark_attempt_failed(
        self,
        event_id: str,
        holder: str,
        *,
        now: datetime,
        failure: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        update: dict[str, Any] = {
            "$set": {"lastFailure": failure},
            "$inc": {"attempts": 1},
            "$unset": {"lease": ""},
        }
        if next_attempt_at is None:
            update["$set"]["status"] = EventStatus.FAILED.value
            update["$unset"]["nextAttemptAt"] = ""
        else:
            update["$set"]["nextAttemptAt"] = next_attempt_at
        result = await self._events.update_one({"_id": event_id, "lease.holder": holder}, update)
        return bool(result.modified_count)

    @_mongo_errors
    async def redeliver_event(self, event_id: str, *, now: datetime) -> StoredEvent | None:
        doc = await self._events.find_one_and_update(
            {"_id": event_id, "status": EventStatus.FAILED.value},
            {
                "$set": {
                    "status": EventStatus.PENDING.value,
                    "attempts": 0,
                    "nextAttemptAt": now,
                },
                "$unset": {"firstAttemptAt": "", "lastFailure": "", "lease": ""},
            },
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            doc = await self._events.find_one({"_id": event_id})
        return _event_from_document(doc) if doc is not None else None

    @_mongo_errors
    async def oldest_undelivered(self) -> datetime | None:
        times: list[datetime] = []
        pending = await self._events.find_one(
            {"status": EventStatus.PENDING.value},
            projection={"timestamp": 1},
            sort=[("seq", ASCENDING)],
        )
        if pending is not None:
            times.append(event_time(pending))
        unrelayed = await self._accounts.find_one(
            {"outbox.id": {"$exists": True}},
            projection={"outbox": 1},
            sort=[("outbox.timestamp", ASCENDING)],
        )
        if unrelayed is not None:
            times += [event_time(event) for event in unrelayed["outbox"]]
        return min(times, default=None)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _kept_changing() -> StoreUnavailable:
    return StoreUnavailable(
        technical_message=f"MongoDB account changed {_EVENT_WRITE_ATTEMPTS} times in a row "
        "while a change and its event were written",
        details=dict(_DETAILS),
    )

# Account attribute -> document field, for ``append_account_event(only_if=...)``.
_ACCOUNT_DOCUMENT_FIELDS = {
    "status": "status",
    "owner_id": "ownerId",
    "platform_account_id": "platformAccountId",
    "access_token_expires_at": "accessTokenExpiresAt",
    "refresh_token_expires_at": "refreshTokenExpiresAt",
    "connected_at": "connectedAt",
    "revoked_at": "revokedAt",
}


def _claimable(now: datetime) -> dict[str, Any]:
    """Pending, due at ``now``, and in flight nowhere (no lease, or an expired one)."""
    return {
        "status": EventStatus.PENDING.value,
        "nextAttemptAt": {"$lte": now},
        "$or": [{"lease": {"$exists": False}}, _expired("lease.expiresAt")],
    }


def _event_from_document(doc: dict[str, Any]) -> StoredEvent:
    lease = doc.get("lease") or {}
    return StoredEvent(
        seq=int(doc["seq"]),
        event={
            "id": doc["_id"],
            "type": doc["type"],
            "timestamp": doc["timestamp"],
            "data": doc["data"],
        },
        account_id=doc["accountId"],
        owner_id=doc["ownerId"],
        status=EventStatus(doc["status"]),
        recorded_at=doc["recordedAt"],
        attempts=int(doc.get("attempts", 0)),
        next_attempt_at=doc.get("nextAttemptAt"),
        first_attempt_at=doc.get("firstAttemptAt"),
        last_failure=doc.get("lastFailure"),
        delivered_at=doc.get("deliveredAt"),
        lease_holder=lease.get("holder"),
        lease_expires_at=lease.get("expiresAt"),
    )


CALL_BUDGETS_COLLECTION = "tiktok_call_budgets"


def _admission_pipeline(now: datetime | None, rule: CallRule) -> list[dict[str, Any]]:
    """The update that admits a call if its logs have room under ``rule``, and records it.

    ``$$NOW`` goes through ``$toLong``/``$toDate`` (milliseconds either way, an identity
    on mongod): SecantusDB holds ``$$NOW`` with microseconds and a time zone, and
    compares it as equal to any stored date, so the window check would always pass.
    """

    def room(log: str, most: int) -> dict[str, Any]:
        # The most-th most recent call is at least the window old (or there are fewer).
        return {
            "$or": [
                {"$lt": [{"$size": log}, most]},
                {"$lte": [{"$arrayElemAt": [log, -most]},
                          {"$subtract": ["$askedAt", rule.window]}]},
            ]
        }

    def record(log: str, most: int) -> dict[str, Any]:
        pushed = {"$slice": [{"$concatArrays": [log, ["$askedAt"]]}, -most]}
        return {"$cond": ["$admitted", pushed, log]}

    checks = [room("$calls", rule.limit)]
    updates = {"calls": record("$calls", rule.limit)}
    if rule.background and rule.background_limit is not None:
        checks.append(room("$background", rule.background_limit))
        updates["background"] = record("$background", rule.background_limit)
    return [
        {
            "$set": {
                "askedAt": {"$toDate": {"$toLong": "$$NOW"}} if now is None else now,
                "calls": {"$ifNull": ["$calls", []]},
                "background": {"$ifNull": ["$background", []]},
            }
        },
        {"$set": {"admitted": {"$and": checks}}},
        {"$set": updates},
    ]
