"""Saved named sessions: the store (in-process and Redis) and, in the app, save in one browser
session and open in another (AppTest against the tiny in-process servers).

Redis tests use the server at ``SEQSAL_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``)
under a key prefix of their own, deleted afterwards; they are skipped when it does not answer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from streamlit.testing.v1 import AppTest
from test_ui_app import app, payloads, run_ok, servers  # noqa: F401  (fixtures)

from ui.generation import CandidateText, Generation
from ui.sessions_store import MemoryStore, RedisStore, SavedSession, StoreError, check_name, decode, encode
from ui.state import MAX_URL_PROMPT_CHARS, DisplayState, SideState, ViewState

TEST_REDIS_URL = os.environ.get("SEQSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


needs_redis = pytest.mark.skipif(not _redis_up(), reason=f"no Redis server answering at {TEST_REDIS_URL}")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    name = f"seqsal-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)


def _session(name: str = "quiche: long prompt") -> SavedSession:
    long_prompt = "Taste-likes: Cheese.\n" * (MAX_URL_PROMPT_CHARS // 10)
    current = SideState(
        example_id="restaurant-copy-paste",
        prompt=long_prompt,
        target_kind="reference",
        reference=" Recommendation: Likely good." * 50,
        selection=(0, 2),
        method="GRAD_DOT_INPUT",
        granularity="CUSTOM_REGEX",
        regex=r"(?m)^Taste",
        stop=("\n\n",),
        temperature=0.7,
        seed=3,
    )
    pinned = SideState(prompt="Short.", model="gpt2", selection=(1,), target_kind="candidate")
    view = ViewState(current=current, pinned=pinned, display=DisplayState(intensity=2.0, shared_scale=True))
    generation = Generation(
        key=pinned.generation_key(),
        prompt="Short.",
        prompt_token_ids=(1, 2),
        model="gpt2",
        candidates=(CandidateText(index=0, text=" Yes.", token_ids=(5, 6), finish_reason="STOP"),),
        elapsed_s=0.5,
        request_id="abc",
    )
    return SavedSession(name=name, view=view, generations={"pin": generation})


def test_a_saved_view_comes_back_exactly() -> None:
    saved = _session()
    back = decode(encode(saved))
    assert back.view == saved.view and back.generations == saved.generations and back.notes == ()
    assert len(back.view.current.prompt) > MAX_URL_PROMPT_CHARS  # longer than a link may carry
    with pytest.raises(StoreError, match="could not be read"):
        decode("{not json")
    assert check_name("  my   session ") == "my session"
    with pytest.raises(ValueError, match="name"):
        check_name("   ")


def test_memory_store() -> None:
    store = MemoryStore()
    assert not store.shared and store.names() == []
    assert store.save(_session("a")) is False and store.save(_session("b")) is False
    assert store.save(_session("a")) is True  # replaced
    assert [name for name, _ in store.names()] == ["a", "b"]  # newest first
    assert store.load("b") is not None and store.load("nope") is None
    store.delete("a")
    assert [name for name, _ in store.names()] == ["b"]


@needs_redis
def test_redis_store_is_shared_by_two_stores(prefix: str) -> None:
    mine, theirs = RedisStore(TEST_REDIS_URL, prefix), RedisStore(TEST_REDIS_URL, prefix)
    assert mine.shared and mine.key == f"{prefix}:ui-sessions:v1"
    assert mine.save(_session("team")) is False
    assert [name for name, _ in theirs.names()] == ["team"]
    opened = theirs.load("team")
    assert opened is not None and opened.view == _session().view
    theirs.delete("team")
    assert mine.names() == [] and mine.load("team") is None
    dead = RedisStore("redis://127.0.0.1:9/0", prefix)
    with pytest.raises(StoreError, match="Redis server did not answer"):
        dead.names()


@needs_redis
def test_save_in_one_session_open_in_another(
    app: AppTest,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("SEQSAL_CACHE_PREFIX", prefix)
    mine = run_ok(app)
    assert any("team's Redis" in c.value for c in mine.sidebar.caption)
    mine.radio(key="w_target_kind").set_value("candidate")
    mine.selectbox(key="w_granularity").set_value("WORDS")
    run_ok(mine)
    mine.session_state["sel_main"] = (1,)
    next(b for b in mine.button if b.label == "Pin for side-by-side").click()
    run_ok(mine)
    mine.selectbox(key="w_model").set_value("gpt2")
    run_ok(mine)
    mine.text_input(key="w_session_name").set_value("gpt2 vs tiny")
    mine.button(key="session_save").click()
    run_ok(mine)
    assert any("Saved session" in s.value for s in mine.success)
    seen = payloads(mine)

    theirs = run_ok(AppTest.from_file(app._script_path, default_timeout=120))
    assert theirs.selectbox(key="w_session_pick").options == ["gpt2 vs tiny"]
    theirs.button(key="session_open").click()
    run_ok(theirs)
    shown = payloads(theirs)
    assert set(shown) == {"main", "pin"}
    for side in ("main", "pin"):  # exactly what the author saw: text, selection, scores, colours
        assert shown[side]["units"] == seen[side]["units"]
        assert shown[side]["selected"] == seen[side]["selected"]
    assert shown["pin"]["selected"] == [1]
    assert theirs.session_state["gen_pin"] == mine.session_state["gen_pin"]
    assert dict(theirs.query_params) == dict(mine.query_params)
