"""The audit batch wire format (ringfence/contract/batches.py)."""

from __future__ import annotations

import pytest

from ringfence.contract.batches import BatchError, batch_msg_id, decode_batch, encode_batch, split_batches
from ringfence.contract.events import SessionNetwork, decode_event, encode_event


def test_a_batch_gives_back_every_event_byte_for_byte():
    lines = [encode_event(SessionNetwork(dst_addr=f"127.0.0.{i}", program="a\nb")) for i in range(3)]
    body = encode_batch(lines)
    assert decode_batch(body, str(len(lines))) == lines
    assert decode_event(decode_batch(body, "3")[1]).dst_addr == "127.0.0.1"


@pytest.mark.parametrize(("body", "count", "problem"), [
    (b"{}\n{}", "3", "says 3 events but the body holds 2"),
    (b"{}", None, "is not a number"),
    (b"{}", "x", "'x' is not a number"),
    (b"", "1", "says 1 events but the body holds 0"),
])
def test_a_malformed_batch_is_refused_with_the_reason(body, count, problem):
    with pytest.raises(BatchError, match=problem):
        decode_batch(body, count)


def test_the_message_id_depends_on_the_events_only():
    a, b = [b'{"uid":"1"}', b'{"uid":"2"}'], [b'{"uid":"1"}', b'{"uid":"3"}']
    assert batch_msg_id(a) == batch_msg_id(list(a))
    assert batch_msg_id(a) != batch_msg_id(b) != batch_msg_id(a[:1])


@pytest.mark.parametrize(("sizes", "max_events", "max_bytes", "expected"), [
    ([10, 10, 10], 2, 1000, [2, 1]),
    ([10, 10, 10], 10, 22, [2, 1]),  # 11 bytes each with its newline
    ([50, 10], 10, 20, [1, 1]),  # too long alone: goes alone
    ([], 10, 100, []),
])
def test_split_batches_respects_both_limits(sizes, max_events, max_bytes, expected):
    lines = [b"x" * n for n in sizes]
    batches = list(split_batches(lines, max_events, max_bytes))
    assert [len(b) for b in batches] == expected
    assert [line for b in batches for line in b] == lines
