"""A local stand-in for TikTok's OAuth 2.0 + user-info API (see ``sandbox.app``)."""

from sandbox.app import RateLimit, Sandbox, SandboxServer
from sandbox.state import SandboxClient, SandboxUser, default_users, hex_challenge, s256_challenge

__all__ = [
    "RateLimit",
    "Sandbox",
    "SandboxClient",
    "SandboxServer",
    "SandboxUser",
    "default_users",
    "hex_challenge",
    "s256_challenge",
]
