"""Saved named sessions: the store (in-process and Redis: lifetimes, no silent overwrite, one
winner of two simultaneous saves, the layout before lifetimes still read) and, in the app, save
in one browser session and open in another, and a taken name replaced only when confirmed
(AppTest against the tiny in-process servers).

Redis tests use the server at ``SEQSAL_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``)
under a key prefix of their own, deleted afterwards; they are skipped when it does not answer.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from streamlit.testing.v1 import AppTest
from test_ui_app import app, payloads, run_ok, servers, texts  # noqa: F401  (fixtures)

from ui.generation import CandidateText, Generation
from ui.sessions_redis import RedisStore
from ui.sessions_store import (
    MemoryStore,
    NameTaken,
    SavedSession,
    SessionInfo,
    Store,
    StoreError,
    check_name,
    decode,
    encode,
)
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


def _session(name: str = "quiche: long prompt", saved_by: str = "") -> SavedSession:
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
    return SavedSession(name=name, view=view, generations={"pin": generation}, saved_by=saved_by)


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


def _names(store: Store) -> list[str]:
    return [info.name for info in store.list_sessions()]


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_memory_store() -> None:
    store = MemoryStore()
    assert not store.shared and store.list_sessions() == []
    first = store.save(_session("a", saved_by="alice"))
    store.save(_session("b"))
    assert first.saved_by == "alice" and first.expires_at is not None
    assert _names(store) == ["b", "a"]  # newest first
    store.save(_session("a"), replace=first)
    assert _names(store) == ["a", "b"]
    loaded = store.load("b")
    assert loaded is not None and loaded.view == _session().view and store.load("nope") is None
    store.delete("a")
    assert _names(store) == ["b"]


def test_memory_store_expires_sessions_and_opening_keeps_one() -> None:
    clock = Clock()
    store = MemoryStore(ttl_s=100.0, clock=clock)
    info = store.save(_session("kept"))
    store.save(_session("dropped"))
    assert info.expires_at == clock.now + 100.0
    clock.now += 80
    assert store.load("kept") is not None  # opened: 100 s from now again
    clock.now += 30  # 110 s after saving
    assert _names(store) == ["kept"] and store.load("dropped") is None
    assert store.list_sessions()[0].expires_at == clock.now - 30 + 100.0
    clock.now += 70
    assert store.list_sessions() == [] and store.load("kept") is None
    store.save(_session("kept"))  # an expired name is free again, no confirmation needed
    forever = MemoryStore(ttl_s=0, clock=clock)
    assert forever.save(_session("x")).expires_at is None
    clock.now += 1e9
    assert _names(forever) == ["x"]


def _redis_stores(prefix: str, ttl_s: float = 3600.0) -> tuple[RedisStore, RedisStore]:
    """Two stores on one Redis and prefix: two UI processes of one instance."""
    return RedisStore(TEST_REDIS_URL, prefix, ttl_s), RedisStore(TEST_REDIS_URL, prefix, ttl_s)


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def stores(request: pytest.FixtureRequest) -> tuple[Store, Store]:
    """Two handles on one set of sessions: one in-process store twice, or two Redis stores."""
    if request.param == "memory":
        store = MemoryStore()
        return store, store
    return _redis_stores(request.getfixturevalue("prefix"))


def test_a_taken_name_is_replaced_only_when_confirmed(stores: tuple[Store, Store]) -> None:
    alice, bob = stores
    original = alice.save(_session("team", saved_by="alice@example.com"))
    with pytest.raises(NameTaken, match=re.escape("already saved by alice@example.com")) as taken:
        bob.save(_session("team", saved_by="bob@example.com"))
    assert taken.value.existing == original  # who saved the one kept, when, and its revision
    kept = bob.load("team")
    assert kept is not None and kept.saved_by == "alice@example.com"
    stale = SessionInfo(name="team", saved_at=original.saved_at, rev="not-the-one-there")
    with pytest.raises(NameTaken):
        bob.save(_session("team", saved_by="bob@example.com"), replace=stale)
    replaced = bob.save(_session("team", saved_by="bob@example.com"), replace=original)
    assert replaced.rev != original.rev and [i.saved_by for i in alice.list_sessions()] == ["bob@example.com"]
    # alice confirms a replacement of the session she was shown: bob's came since, so it is refused
    with pytest.raises(NameTaken, match=re.escape("bob@example.com")) as again:
        alice.save(_session("team", saved_by="alice@example.com"), replace=original)
    assert again.value.existing.rev == replaced.rev
    kept = alice.load("team")
    assert kept is not None and kept.saved_by == "bob@example.com"


def test_two_simultaneous_saves_of_one_name_one_wins(stores: tuple[Store, Store]) -> None:
    """Savers released together on the same names: each name has one winner, whose session is kept."""
    savers, rounds = 4, 50
    handles = [stores[i % 2] for i in range(savers)]
    start = threading.Barrier(savers)
    outcomes: dict[tuple[int, int], str] = {}

    def save(who: int) -> None:
        for r in range(rounds):
            start.wait(10)
            try:
                handles[who].save(_session(f"race {r}", saved_by=f"saver {who}"))
                outcomes[(r, who)] = "won"
            except NameTaken as exc:
                outcomes[(r, who)] = f"lost to {exc.existing.saved_by}"

    threads = [threading.Thread(target=save, args=(who,)) for who in range(savers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == savers * rounds
    for r in range(rounds):
        winners = [who for who in range(savers) if outcomes[(r, who)] == "won"]
        assert len(winners) == 1, (r, [outcomes[(r, who)] for who in range(savers)])
        kept = stores[1].load(f"race {r}")
        assert kept is not None and kept.saved_by == f"saver {winners[0]}"
        assert all(
            outcomes[(r, w)] == f"lost to saver {winners[0]}" for w in range(savers) if w != winners[0]
        )


@needs_redis
def test_redis_store_is_shared_by_two_stores(prefix: str) -> None:
    mine, theirs = _redis_stores(prefix)
    assert mine.shared and mine.index_key == f"{prefix}:ui-sessions:v2:index"
    mine.save(_session("team"))
    assert _names(theirs) == ["team"]
    opened = theirs.load("team")
    assert opened is not None and opened.view == _session().view
    theirs.delete("team")
    assert mine.list_sessions() == [] and mine.load("team") is None
    dead = RedisStore("redis://127.0.0.1:9/0", prefix, 60)
    with pytest.raises(StoreError, match="Redis server did not answer"):
        dead.list_sessions()


def _wait_for(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_redis
def test_redis_sessions_expire_with_their_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    store = RedisStore(TEST_REDIS_URL, prefix, ttl_s=1.0)
    info = store.save(_session("brief"))
    key = store.session_key("brief")
    assert 0 < client.pttl(key) <= 1000 and info.expires_at is not None
    assert abs(info.expires_at - time.time()) < 5  # Redis's clock, one second ahead
    assert client.zscore(store.index_key, "brief") == pytest.approx(info.expires_at * 1000)
    _wait_for(lambda: store.list_sessions() == [], "the session to expire")
    assert not client.exists(key) and client.zcard(store.index_key) == 0  # the index is pruned too
    assert store.load("brief") is None
    store.save(_session("brief"))  # the name is free again

    forever = RedisStore(TEST_REDIS_URL, prefix, ttl_s=0)
    assert forever.save(_session("kept")).expires_at is None
    assert client.pttl(forever.session_key("kept")) == -1  # no expiry at all
    assert client.zscore(forever.index_key, "kept") == float("inf")
    assert [i.expires_at for i in forever.list_sessions() if i.name == "kept"] == [None]


@needs_redis
def test_opening_a_redis_session_restarts_its_lifetime(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    store = RedisStore(TEST_REDIS_URL, prefix, ttl_s=3600.0)
    store.save(_session("used"))
    key = store.session_key("used")
    client.pexpire(key, 5_000)  # as if saved almost an hour ago
    client.zadd(store.index_key, {"used": (time.time() + 5) * 1000})
    assert store.load("used") is not None
    assert client.pttl(key) > 3_500_000
    (info,) = store.list_sessions()
    assert info.expires_at is not None and info.expires_at > time.time() + 3500
    client.delete(key)  # gone behind the index's back (e.g. evicted): dropped from the list
    assert store.list_sessions() == [] and client.zcard(store.index_key) == 0


def _old_layout_write(client: object, prefix: str, session: SavedSession) -> None:
    """Write a session as the UI did before lifetimes: one hash of JSON, one of saved-at times."""
    import json

    raw = json.loads(encode(session))
    raw.pop("saved_by")  # the old format had no author
    client.hset(f"{prefix}:ui-sessions:v1", session.name, json.dumps(raw))  # type: ignore[attr-defined]
    client.hset(f"{prefix}:ui-sessions:v1:saved-at", session.name, repr(session.saved_at))  # type: ignore[attr-defined]


@needs_redis
def test_sessions_saved_before_lifetimes_are_still_read(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    old = _session("from last year")
    old = SavedSession(name=old.name, view=old.view, generations=old.generations, saved_at=1_700_000_000.0)
    _old_layout_write(client, prefix, old)
    _old_layout_write(client, prefix, _session("taken"))
    store = RedisStore(TEST_REDIS_URL, prefix, ttl_s=3600.0)
    listed = {info.name: info for info in store.list_sessions()}
    assert set(listed) == {"from last year", "taken"}
    assert listed["from last year"].saved_at == 1_700_000_000.0 and listed["from last year"].saved_by == ""
    assert not client.exists(store.legacy_key) and not client.exists(store.legacy_stamps_key)  # moved
    assert 3_500_000 < client.pttl(store.session_key("from last year")) <= 3_600_000  # a full lifetime
    opened = store.load("from last year")
    assert opened is not None and opened.view == old.view and opened.generations == old.generations
    with pytest.raises(NameTaken):  # an old session's name is as taken as a new one's
        store.save(_session("taken", saved_by="bob"))
    # a UI process of the old version writes after the move: read (and moved) on the next call
    _old_layout_write(client, prefix, _session("written by an old UI"))
    assert store.load("written by an old UI") is not None
    assert set(_names(store)) == {"from last year", "taken", "written by an old UI"}
    store.delete("taken")
    assert set(_names(store)) == {"from last year", "written by an old UI"}


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
    assert theirs.selectbox(key="w_session_pick").value == "gpt2 vs tiny"
    assert [o.split(" · ")[0] for o in theirs.selectbox(key="w_session_pick").options] == ["gpt2 vs tiny"]
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


def _logged_in(at: AppTest, email: str) -> AppTest:
    """The app as someone logged in through OIDC (an ``[auth]`` section and a user)."""
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x"}
    at.user = {"is_logged_in": True, "email": email, "name": email.split("@")[0]}
    return at


def _save_as(at: AppTest, name: str) -> AppTest:
    at.text_input(key="w_session_name").set_value(name)
    at.button(key="session_save").click()
    return run_ok(at)


@needs_redis
def test_saving_under_a_taken_name_asks_before_replacing(
    app: AppTest,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("SEQSAL_CACHE_PREFIX", prefix)
    store = RedisStore(TEST_REDIS_URL, prefix, 30 * 86400)
    alice = run_ok(_logged_in(app, "alice@example.com"))
    assert any("30 days after it is last saved or opened" in c for c in texts(alice.sidebar.caption))
    _save_as(alice, "our view")
    assert any("Saved session" in s and "expires in 30 days" in s for s in texts(alice.success))
    (info,) = store.list_sessions()
    assert info.saved_by == "alice@example.com"
    label = alice.selectbox(key="w_session_pick").options[0]
    assert label.startswith("our view · alice@example.com · ")
    assert any(c.startswith("Saved by alice@example.com on ") for c in texts(alice.sidebar.caption))

    bob = run_ok(_logged_in(AppTest.from_file(app._script_path, default_timeout=120), "bob@example.com"))
    bob.radio(key="w_target_kind").set_value("candidate")
    run_ok(bob)
    _save_as(bob, "our view")
    assert not bob.success  # refused: nothing saved, a warning with the choice instead
    assert any("already exists (saved by alice@example.com on" in w for w in texts(bob.warning))
    assert store.list_sessions() == [info]
    bob.button(key="session_keep").click()
    run_ok(bob)
    assert any("Nothing replaced" in i for i in texts(bob.info))
    assert [b for b in bob.button if b.key == "session_replace"] == []
    loaded = store.load("our view")
    assert loaded is not None and loaded.view.current.target_kind != "candidate"

    _save_as(bob, "our view")
    # carol replaces it while bob reads the warning: bob's confirmation names alice's, so it fails
    carol = store.save(_session("our view", saved_by="carol@example.com"), replace=info)
    bob.button(key="session_replace").click()
    run_ok(bob)
    assert any("was saved again meanwhile (saved by carol@example.com" in w for w in texts(bob.warning))
    assert [i.rev for i in store.list_sessions()] == [carol.rev]
    bob.button(key="session_replace").click()  # confirmed again, for carol's: replaced
    run_ok(bob)
    assert any("Replaced session “our view”" in s for s in texts(bob.success))
    assert [b for b in bob.button if b.key == "session_replace"] == []
    (now,) = store.list_sessions()
    assert now.saved_by == "bob@example.com" and now.rev != carol.rev
    replaced = store.load("our view")
    assert replaced is not None and replaced.view.current.target_kind == "candidate"
