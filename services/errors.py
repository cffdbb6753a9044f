"""Kept for compatibility: the domain exceptions now live in ``core.errors``.

Code written before the move (or on a branch made before it) imports them from here
and keeps working: these are the very same classes. New code imports ``core.errors``.
"""

from core.errors import (
    AuthorizationDenied,
    ConfigError,
    Conflict,
    GatewayError,
    InvalidState,
    NotFound,
    PermissionDenied,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    ScopeMissing,
    ServiceUnavailable,
    StateConflict,
    StoreSetupFailed,
    StoreUnavailable,
    Unauthenticated,
    ValidationFailed,
)

# The names this module defined before the move.
__all__ = [
    "AuthorizationDenied",
    "ConfigError",
    "Conflict",
    "GatewayError",
    "InvalidState",
    "NotFound",
    "PermissionDenied",
    "ProviderRejected",
    "ProviderUnavailable",
    "RateLimited",
    "ScopeMissing",
    "ServiceUnavailable",
    "StateConflict",
    "StoreSetupFailed",
    "StoreUnavailable",
    "Unauthenticated",
    "ValidationFailed",
]
