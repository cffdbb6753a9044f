"""Kept for compatibility: the domain exceptions now live in ``core.errors``.

Code written before the move (or on a branch made before it) imports them from here
and keeps working: these are the very same classes. New code imports ``core.errors``.
"""

from core.errors import *  # noqa: F403
from core.errors import __all__ as __all__
