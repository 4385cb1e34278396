"""The locks service's pure core: checks, plans, messages, events."""

from __future__ import annotations

import copy
import datetime as dt

import msgspec
import pytest

from ringfence.contract import api, documents, events
from ringfence.contract import resources as r
from services.locks import core

NOW = dt.datetime(2021, 8, 14, 12, 0, 0, 250000, tzinfo=dt.UTC)
UUID = "dc7cee9d-fe5e-4534-a90d-db770f0234a1"

SEED = {  # the seed's document, as YAML gives it to the CLI
    "kind": "lock",
    "version": "v2",
    "metadata": {"name": UUID},
    "spec": {"target": {"user": "foo@example.com"}, "message": "Suspicious activity.",
             "expires": "2021-08-14T22:27:00Z"},
}


def with_(doc: dict, path: str, value) -> dict:
    """A copy of `doc` with the dotted `path` set; value None removes the key."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    cur = out
    for step in parents:
        cur = cur.setdefault(step, {})
    if value is None:
        cur.pop(last, None)
    else:
        cur[last] = value
    return out


def lock(name: str = UUID, expires: str = "", created: str = "", **target: str) -> r.Lock:
    return r.Lock(metadata=r.Metadata(name=name),
                  spec=r.LockSpec(target=r.LockTarget(**target), expires=expires, created=created))


def raises(fn, *args) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        fn(*args)
    return info.value


# --- create -f documents ------------------------------------------------------------------------


def test_the_seed_document_is_accepted_and_stamped():
    [doc] = core.check_documents([SEED])
    [change] = core.plan_create([doc], set(), "admin", NOW)
    assert change.key == UUID and change.message == f'lock "{UUID}" has been created'
    stored = msgspec.json.decode(change.value, type=r.Lock)
    assert stored.spec.target == r.LockTarget(user="foo@example.com")
    assert stored.spec.message == "Suspicious activity."
    assert stored.spec.expires == "2021-08-14T22:27:00Z"
    assert (stored.spec.created, stored.spec.created_by) == ("2021-08-14T12:00:00.25Z", "admin")
    assert change.warnings == ()
    assert isinstance(change.event, events.LockCreated)
    assert msgspec.to_builtins(change.event) | {"uid": "", "time": ""} == msgspec.to_builtins(events.LockCreated(
        uid="", time="", name=UUID, target={"user": "foo@example.com"}, message="Suspicious activity.",
        expires="2021-08-14T22:27:00Z", user="admin"))


def test_an_existing_lock_is_updated_and_the_request_cannot_set_who_created_it():
    doc = with_(with_(SEED, "spec.created_by", "mallory"), "spec.created", "1999-01-01T00:00:00Z")
    [change] = core.plan_create(core.check_documents([doc]), {UUID}, "", NOW)
    assert change.message == f'lock "{UUID}" has been updated'
    stored = msgspec.json.decode(change.value, type=r.Lock)
    assert (stored.spec.created, stored.spec.created_by) == ("2021-08-14T12:00:00.25Z", "")


def test_expiry_is_normalised_to_utc():
    [doc] = core.check_documents([with_(SEED, "spec.expires", "2021-08-15T00:27:00.500+02:00")])
    assert doc.lock.spec.expires == "2021-08-14T22:27:00.5Z"


def test_an_expired_document_is_accepted_with_a_warning():
    [change] = core.plan_create(core.check_documents([with_(SEED, "spec.expires", "2021-08-14T11:00:00Z")]),
                                set(), "", NOW)
    assert change.warnings == (f'warning: lock "{UUID}" expired at 2021-08-14T11:00:00Z; it is not in force '
                               "and will be removed",)
    assert core.create_messages([change]) == [change.message, *change.warnings]


@pytest.mark.parametrize("name", [UUID, "maintenance-2021", "a", "x.y", "a=b_c", "A1"])
def test_good_names(name):
    assert core.check_documents([with_(SEED, "metadata.name", name)])


@pytest.mark.parametrize("path, value, problem", [
    ("spec.target", {}, "spec.target: at least one target field must be set"),
    ("spec.target", {"user": ""}, "spec.target: at least one target field must be set"),
    ("spec.target.usr", "a", "spec.target.usr: unknown field"),
    ("spec.target.user", " alice", 'spec.target.user: " alice" is not a valid value'),
    ("spec.target.role", "a\nb", 'spec.target.role: "a\\nb" is not a valid value'),  # escaped: one line
    ("spec.target.login", "x" * 254, "spec.target.login: "),
    ("spec.expires", "tomorrow", 'spec.expires: "tomorrow" is not an RFC 3339 time'),
    ("spec.expires", "2021-08-14", 'spec.expires: "2021-08-14" is not an RFC 3339 time'),
    ("spec.expires", 5, "spec.expires: 5: expected `str`, got `int`"),
    ("spec.message", "m" * (r.MAX_MESSAGE_LEN + 1), f"spec.message: {r.MAX_MESSAGE_LEN + 1} characters; at most"),
    ("spec.message", "bell\x07", "spec.message: "),
    ("metadata.name", "a/b", 'metadata.name: "a/b" is not a valid lock name'),
    ("metadata.name", ".a", 'metadata.name: ".a" is not a valid lock name'),
    ("metadata.name", "a.", 'metadata.name: "a." is not a valid lock name'),
    ("metadata.name", "a..b", 'metadata.name: "a..b" is not a valid lock name'),
    ("metadata.name", "foo@example.com", "is not a valid lock name"),
    ("metadata.name", "", 'metadata.name: "" is not a valid lock name'),
    ("metadata.name", "n" * 254, "is not a valid lock name"),
    ("metadata", None, "object missing required field `metadata`"),
    ("spec", None, "object missing required field `spec`"),
    ("version", "v3", 'version: "v3": invalid enum value'),
    ("kind", "role", 'kind "role" is served by the policy service, not the locks service'),
    ("kind", "nope", 'kind: "nope": invalid value'),
    ("spec.ttl", "10h", "spec.ttl: unknown field"),
])
def test_bad_documents_are_named_with_path_and_value(path, value, problem):
    error = raises(core.check_documents, [with_(SEED, path, value)])
    assert error.kind == "invalid"
    assert str(error).startswith("document 1 ("), str(error)
    assert problem in str(error), str(error)


def test_every_problem_of_every_document_is_reported_and_duplicates_are_refused():
    docs = [SEED, with_(SEED, "spec.target", {}), SEED, with_(with_(SEED, "metadata.name", "b"),
                                                                 "spec.expires", "x")]
    assert str(raises(core.check_documents, docs)).splitlines() == [
        f'document 2 (lock "{UUID}"): spec.target: at least one target field must be set',
        f'document 3 (lock "{UUID}"): the request already contains this lock (document 1)',
        'document 4 (lock "b"): spec.expires: "x" is not an RFC 3339 time; use e.g. 2021-08-14T22:27:00Z',
    ]


@pytest.mark.parametrize("data, problem", [
    (b"{", "malformed create request"),
    (b'{"resources": []}', "the request contains no documents"),
    (b'{"resources": "x"}', "malformed create request"),
])
def test_bad_create_requests(data, problem):
    assert problem in str(raises(documents.decode_create_request, data))


def test_create_request_round_trip():
    body = msgspec.json.encode(api.CreateRequest(resources=[msgspec.Raw(msgspec.json.encode(SEED))], dry_run=True))
    assert documents.decode_create_request(body) == ([SEED], True)


# --- ringfence lock ----------------------------------------------------------------------------------


def lock_request(**kw) -> api.LockRequest:
    target = kw.pop("target", {"user": "foo@example.com"})
    return api.LockRequest(target=r.LockTarget(**target), **kw)


@pytest.mark.parametrize("kw, expires", [
    ({}, ""),
    ({"ttl": "10h"}, "2021-08-14T22:00:01Z"),  # rounded up to a whole second
    ({"ttl": "1s"}, "2021-08-14T12:00:02Z"),
    ({"ttl": "1h30m"}, "2021-08-14T13:30:01Z"),
    ({"ttl": "750ms"}, "2021-08-14T12:00:01Z"),
    ({"expires": "2021-08-14T22:27:00Z"}, "2021-08-14T22:27:00Z"),
    ({"expires": "2021-08-15T00:27:00+02:00"}, "2021-08-14T22:27:00Z"),
    ({"expires": "2021-08-14T12:00:00.3Z"}, "2021-08-14T12:00:00.3Z"),
])
def test_lock_expiry_from_ttl_or_expires(kw, expires):
    change = core.plan_lock(lock_request(message="Suspicious activity.", **kw), UUID, "admin", NOW)
    assert change.message == f'Created a lock with name "{UUID}".'
    stored = msgspec.json.decode(change.value, type=r.Lock)
    assert stored.metadata.name == UUID and stored.spec.expires == expires
    assert stored.spec.message == "Suspicious activity." and stored.spec.created_by == "admin"
    assert change.event.expires == expires and change.event.target == {"user": "foo@example.com"}


def test_a_key_fingerprint_lock_is_accepted():
    key = "SHA256:mXu4uS8Valt9tkpP1RLL+mNxjogzy99UT3rBT6tOykE"
    change = core.plan_lock(lock_request(target={"device": key, "mfa_device": key}), UUID, "", NOW)
    assert change.event.target == {"mfa_device": key, "device": key}
    [doc] = core.check_documents([with_(SEED, "spec.target", {"device": key})])
    assert doc.lock.spec.target == r.LockTarget(device=key)


def test_a_document_locking_a_windows_desktop_is_refused_with_the_reason():
    error = raises(core.check_documents, [with_(SEED, "spec.target", {"windows_desktop": "WIN-1"})])
    assert str(error) == (f'document 1 (lock "{UUID}"): spec.target.windows_desktop: "WIN-1": cannot be locked '
                          "here: Ringfence controls OpenSSH sessions only; there are no Windows desktops to lock")


def test_unlock_still_lifts_a_stored_lock_on_a_target_no_new_lock_may_have():
    stored = {"old": core.Stored(lock(name="old", access_request="ar-1"), 3)}
    changes, _ = core.plan_unlock(r.LockTarget(access_request="ar-1"), stored, "admin", NOW)
    assert [c.key for c in changes] == ["old"]


def test_several_target_fields_may_be_combined():
    change = core.plan_lock(lock_request(target={"user": "a", "login": "root"}), UUID, "", NOW)
    assert change.event.target == {"user": "a", "login": "root"}


@pytest.mark.parametrize("kw, message", [
    ({"target": {}}, "at least one target field must be set"),
    ({"ttl": "10h", "expires": "2031-01-01T00:00:00Z"}, "use only one of --expires and --ttl"),
    ({"ttl": "ten hours"}, '--ttl: "ten hours" is not a duration; use e.g. 90s, 15m, 10h or 1h30m'),
    ({"ttl": "0s"}, '--ttl: "0s" must be longer than zero (leave --ttl out for no expiry)'),
    ({"ttl": "-1h"}, '--ttl: "-1h" is not a duration; use e.g. 90s, 15m, 10h or 1h30m'),
    ({"ttl": "200y"}, '--ttl: "200y" is not a duration'),
    ({"expires": "2021-08-14T12:00:00Z"},
     '--expires: "2021-08-14T12:00:00Z" is not in the future (it is now 2021-08-14T12:00:00Z)'),
    ({"expires": "2021-08-14T12:00:00.25Z"}, '--expires: "2021-08-14T12:00:00.25Z" is not in the future'),
    ({"expires": "soon"}, '--expires: "soon" is not an RFC 3339 time; use e.g. 2021-08-14T22:27:00Z'),
    ({"target": {"server_id": " x"}}, '--server-id: " x" is not a valid value'),
    ({"target": {"device": "9cdfc0ad-64b7-4d9c-9342-50e97f418ba0"}},
     '--device: "9cdfc0ad-64b7-4d9c-9342-50e97f418ba0" is not an SSH key fingerprint: device locks match the '
     "SHA256 fingerprint of the key (or the certificate's key) a session logged in with, as `ssh-keygen -lf "
     "KEY.pub` prints it (SHA256: and 43 characters)"),
    ({"target": {"mfa_device": "SHA256:short"}}, '--mfa-device: "SHA256:short" is not an SSH key fingerprint: '
     "mfa_device locks match the SHA256 fingerprint of the FIDO security key"),
    ({"target": {"access_request": "261e80c5-357b-4c43-9b67-40a6bc4c6e4d"}},
     '--access-request: "261e80c5-357b-4c43-9b67-40a6bc4c6e4d": cannot be locked here: Ringfence has no access '
     "requests"),
    ({"target": {"windows_desktop": "WIN-1", "user": "a"}},
     '--windows-desktop: "WIN-1": cannot be locked here: Ringfence controls OpenSSH sessions only'),
    ({"message": "m" * (r.MAX_MESSAGE_LEN + 1)}, f"--message: {r.MAX_MESSAGE_LEN + 1} characters; at most 4096"),
])
def test_bad_lock_requests(kw, message):
    error = raises(core.plan_lock, lock_request(**kw), UUID, "", NOW)
    assert error.kind == "invalid"
    assert str(error).startswith(message), str(error)


def test_the_exact_errors_of_the_reference():
    assert str(raises(core.plan_lock, lock_request(target={}), UUID, "", NOW)) == \
        "at least one target field must be set"
    assert str(raises(core.plan_lock, lock_request(ttl="1h", expires="2031-01-01T00:00:00Z"), UUID, "", NOW)) == \
        "use only one of --expires and --ttl"


# --- get, rm, unlock ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lock", "locks"])
def test_kinds_served(kind):
    core.check_kind(kind)


@pytest.mark.parametrize("kind, message", [
    ("role", 'kind "role" is served by the policy service, not the locks service'),
    ("cap", 'kind "cluster_auth_preference" is served by the policy service'),
    ("lockz", 'unknown kind "lockz"'),
])
def test_kinds_not_served(kind, message):
    assert message in str(raises(core.check_kind, kind))


def test_listing_shows_locks_in_force_oldest_first():
    stored = [
        lock("b", created="2021-08-14T10:00:00Z", user="b"),
        lock("a", created="2021-08-14T11:00:00Z", user="a", expires="2021-08-14T13:00:00Z"),
        lock("gone", created="2021-08-14T09:00:00Z", user="c", expires="2021-08-14T12:00:00Z"),
        lock("c", created="2021-08-14T10:00:00Z", user="c"),
    ]
    assert [x.metadata.name for x in core.listing(stored, NOW)] == ["b", "c", "a"]
    assert core.listing([], NOW) == []


def test_get_one():
    live = lock("a", user="a")
    assert core.get_one("a", live, NOW) == [live]
    error = raises(core.get_one, "a", None, NOW)
    assert (str(error), error.kind) == ('lock "a" not found', "not_found")
    expired = lock("a", user="a", expires="2021-08-14T11:00:00Z")
    assert str(raises(core.get_one, "a", expired, NOW)) == 'lock "a" not found (it expired at 2021-08-14T11:00:00Z)'


def test_delete():
    change = core.plan_delete(UUID, core.Stored(lock(user="a"), 7), "admin")
    assert (change.key, change.value, change.last) == (UUID, None, 7)
    assert change.message == f'lock "{UUID}" has been deleted'
    assert isinstance(change.event, events.LockDeleted)
    assert (change.event.name, change.event.reason, change.event.user) == (UUID, "deleted", "admin")
    error = raises(core.plan_delete, "nope", None, "")
    assert (str(error), error.kind) == ('lock "nope" not found', "not_found")
    assert "name the lock" in str(raises(core.plan_delete, "", None, ""))


STORE = {
    "l1": core.Stored(lock("l1", user="alice"), 1),
    "l2": core.Stored(lock("l2", user="alice", expires="2021-08-14T13:00:00Z"), 2),
    "l3": core.Stored(lock("l3", user="alice", role="dev"), 3),
    "l4": core.Stored(lock("l4", user="bob"), 4),
    "l5": core.Stored(lock("l5", user="alice", expires="2021-08-14T11:00:00Z"), 5),  # expired
    "l6": core.Stored(lock("l6", role="dev"), 6),
}


@pytest.mark.parametrize("target, removed, message", [
    ({"user": "alice"}, ["l1", "l2"], 'removed 2 locks targeting User:"alice"'),
    ({"user": "bob"}, ["l4"], 'removed 1 lock targeting User:"bob"'),
    ({"role": "dev", "user": "alice"}, ["l3"], 'removed 1 lock targeting User:"alice", Role:"dev"'),
    ({"role": "dev"}, ["l6"], 'removed 1 lock targeting Role:"dev"'),
])
def test_unlock_removes_every_lock_with_exactly_that_target(target, removed, message):
    changes, text = core.plan_unlock(r.LockTarget(**target), STORE, "admin", NOW)
    assert text == message
    assert [(c.key, c.value, c.last) for c in changes] == [(n, None, STORE[n].revision) for n in removed]
    assert [(c.event.name, c.event.reason, c.event.user) for c in changes] == [
        (n, "unlocked", "admin") for n in removed]


@pytest.mark.parametrize("target, message", [
    ({"user": "carol"}, 'no lock targets User:"carol"'),
    ({"login": "root"}, 'no lock targets Login:"root"'),
    ({"user": "bob", "role": "dev"}, 'no lock targets User:"bob", Role:"dev"'),
])
def test_unlock_with_nothing_to_remove_is_an_error(target, message):
    error = raises(core.plan_unlock, r.LockTarget(**target), STORE, "", NOW)
    assert (str(error), error.kind) == (message, "not_found")


def test_unlock_points_at_locks_that_include_the_target_among_others():
    store = {k: STORE[k] for k in ("l3", "l4")}
    error = raises(core.plan_unlock, r.LockTarget(user="alice"), store, "", NOW)
    assert str(error) == ('no lock targets User:"alice" exactly; these target it among others: '
                          'lock "l3" (User:"alice", Role:"dev"); remove them with ringfence rm locks/NAME')


def test_unlock_needs_a_target():
    assert str(raises(core.plan_unlock, r.LockTarget(), STORE, "", NOW)) == "at least one target field must be set"


# --- expiry --------------------------------------------------------------------------------------------


def test_plan_expiry_deletes_what_is_no_longer_in_force_at_its_revision():
    store = dict(STORE)
    store["l7"] = core.Stored(lock("l7", user="x", expires="2021-08-14T12:00:00.25Z"), 9)  # exactly now
    changes = core.plan_expiry(store, NOW)
    assert [(c.key, c.value, c.last) for c in changes] == [("l5", None, 5), ("l7", None, 9)]
    assert changes[0].message == 'lock "l5" expired at 2021-08-14T11:00:00Z'
    assert (changes[0].event.name, changes[0].event.reason, changes[0].event.user) == ("l5", "expired", "")
    # Two services expiring the same revision publish the same event uid; another revision another one.
    assert changes[0].event.uid == core.plan_expiry(store, NOW)[0].event.uid == core.expiry_uid("l5", 5)
    assert core.expiry_uid("l5", 5) != core.expiry_uid("l5", 6)
    assert core.plan_expiry(store, NOW - dt.timedelta(days=1)) == []


@pytest.mark.parametrize("due, cap, expected", [
    (None, 60.0, 60.0),
    (NOW + dt.timedelta(seconds=10), 60.0, 10.0),
    (NOW + dt.timedelta(seconds=600), 60.0, 60.0),
    (NOW - dt.timedelta(seconds=1), 60.0, 0.0),
    (NOW + dt.timedelta(microseconds=1), 60.0, 0.001),  # never wakes before the instant
    (NOW + dt.timedelta(seconds=10), 3.0, 3.0),
])
def test_seconds_until(due, cap, expected):
    assert core.seconds_until(due, NOW, cap) == expected
