"""Replaying the recorded TikTok HTTP in tests (cassettes/, ``make cassettes``).

What the recorder and the tests agree on (scenarios, placeholders, fake tokens,
matching) is ``scripts/cassette_scenarios.py``; this module is the test side.

Replay is strict: ``replay()`` / ``assert_all_played()`` insist that every
recorded interaction was played exactly once and that nothing unrecorded was
asked, so a test cannot pass on the wrong path.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vcr.cassette import Cassette
from vcr.request import Request

from scripts.cassette_scenarios import FAKE_TOKENS, cassette_path, tiktok_vcr
from tests.support import CLIENT_SECRET


def assert_all_played(cassette: Cassette) -> None:
    """Every recorded interaction was played exactly once, and nothing else was asked.

    The second half matters: vcrpy answers an unrecorded request with an error
    that a lenient client could turn into "TikTok unavailable", and then the
    recorded interactions alone would not show that an extra request was made.
    """
    unplayed = [
        f"#{index} {request.method} {request.uri}"
        for index, request in enumerate(cassette.requests)
        if cassette.play_counts[index] == 0
    ]
    unrecorded = [f"{r.method} {r.uri}" for r in getattr(cassette, "unrecorded_requests", [])]
    assert (
        cassette.all_played and len(cassette.requests) == cassette.play_count and not unrecorded
    ), (
        f"cassette {Path(cassette.path).name}: played {cassette.play_count} time(s) for "
        f"{len(cassette.requests)} recorded interaction(s); not played: "
        f"{', '.join(unplayed) or 'none'}; unrecorded requests made: "
        f"{', '.join(unrecorded) or 'none'} (the gateway took another path than the recording)"
    )


def _track_unrecorded(cassette: Cassette) -> None:
    """Remember every request to TikTok the cassette could not answer."""
    cassette.unrecorded_requests = []
    can_play = cassette.can_play_response_for

    def tracking_can_play(request: Request) -> bool:
        playable = can_play(request)
        # filter_request() is None for requests replay ignores (the tests' own, to localhost).
        if not playable and cassette.filter_request(request) is not None:
            cassette.unrecorded_requests.append(request)
        return playable

    # The Tornado stub asks the cassette object it was given, so this instance hook sees it.
    cassette.can_play_response_for = tracking_can_play


@contextlib.contextmanager
def replay(scenario: str) -> Iterator[Cassette]:
    """Replay one scenario's cassette; on a clean exit, also ``assert_all_played``."""
    path = cassette_path(scenario)
    # A missing file would replay as an empty cassette: refuse instead.
    assert path.is_file(), f"missing cassette {path}; record it with `make cassettes`"
    with tiktok_vcr().use_cassette(path.name) as cassette:
        _track_unrecorded(cassette)
        yield cassette
        assert_all_played(cassette)


def recorded_json(cassette: Cassette, index: int) -> Any:
    """The JSON body of the ``index``-th recorded response."""
    return json.loads(cassette.responses[index]["body"]["string"])


def assert_nothing_secret(path: Path) -> str:
    """The cassette file exists and holds no local address, no real client secret and
    no token but the fakes; its text."""
    assert path.is_file(), f"missing {path}: run `make cassettes`"
    text = path.read_text()
    assert "127.0.0.1" not in text and "localhost" not in text
    assert CLIENT_SECRET not in text
    assert set(re.findall(r"\b(?:act|rft)\.[^\s\"',]+", text)) <= set(FAKE_TOKENS.values())
    return text
