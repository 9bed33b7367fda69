"""OutputHandoff: urgent outputs wake the event loop at once; steady ones whose interval has passed wait for the
engine thread's wake_due() (called right before a forward), or for flush() when the engine goes idle; one wake is
in flight at a time and the streams get every item in order."""

from __future__ import annotations

import asyncio

from strata.server.output_handoff import OutputHandoff
from strata.server.request_stream import RequestStream


class _Owner:
    def abort(self, request_id: str) -> None:
        pass


class _Loop:
    """Records call_soon_threadsafe instead of running it (the test plays the event loop)."""

    def __init__(self):
        self.scheduled = []

    def call_soon_threadsafe(self, fn, *args):
        self.scheduled.append((fn, args))

    def run(self) -> None:
        todo, self.scheduled = self.scheduled, []
        for fn, args in todo:
            fn(*args)


async def _stream(request_id: str) -> RequestStream:  # asyncio.Queue binds no loop until used: built in one
    return RequestStream(_Owner(), request_id, None)


def _handoff(interval_s: float) -> tuple[OutputHandoff, _Loop, RequestStream]:
    h = OutputHandoff(interval_s)
    h.loop = loop = _Loop()
    return h, loop, asyncio.run(_stream("r"))


def _taken(stream: RequestStream) -> list:
    items = []
    while not stream.queue.empty():
        items.append(stream.queue.get_nowait())
    return items


def test_steady_outputs_wait_for_the_next_forward_once_the_interval_passed():
    h, loop, stream = _handoff(0.0)  # every step's outputs are due
    h.deliver_all([(stream, "a")])
    assert loop.scheduled == []  # due, but the loop is woken right before the next forward, not here
    h.wake_due()
    assert len(loop.scheduled) == 1
    h.deliver_all([(stream, "b")])  # a wake is in flight: b joins the pending list it will take
    h.wake_due()
    assert len(loop.scheduled) == 1
    loop.run()
    assert _taken(stream) == ["a", "b"]
    h.wake_due()  # nothing pending: no wake
    assert loop.scheduled == []


def test_outputs_within_the_interval_are_not_due_until_flush():
    h, loop, stream = _handoff(1e9)
    h.deliver_all([(stream, "first")], urgent=True)  # a first token goes at once
    assert len(loop.scheduled) == 1
    loop.run()
    h.deliver_all([(stream, "x")])
    h.wake_due()
    assert loop.scheduled == []  # the interval has not passed
    h.flush()  # the engine goes idle
    loop.run()
    assert _taken(stream) == ["first", "x"]


def test_urgent_output_goes_at_once_behind_the_pending_ones():
    h, loop, stream = _handoff(0.0)
    h.deliver_all([(stream, "a")])
    h.deliver(stream, "end")
    assert len(loop.scheduled) == 1
    loop.run()
    assert _taken(stream) == ["a", "end"]


def _deferred_pair():
    """Two deferred outputs of one request (steps of 2 and 1 tokens) and the detokenizer they feed."""
    from strata.engine.detokenizer import IncrementalDetokenizer
    from strata.engine.outputs import DeferredOutput
    from strata.engine.sampling_params import SamplingParams
    from strata.engine.sequence import Sequence

    seq = Sequence("r", [1, 2], SamplingParams())
    seq.token_ids += [5, 6, 7]
    detok = IncrementalDetokenizer(None, [1, 2], [], True)  # no tokenizer: it counts the tokens it is fed
    first = DeferredOutput([seq], [(detok, [5, 6], 2, False, None, None, None)], False, 0, None, None)
    last = DeferredOutput([seq], [(detok, [7], 3, True, "length", None, None)], True, 0, None, None)
    return first, last, detok


def test_deferred_outputs_are_resolved_in_step_order_as_the_loop_takes_them():
    from strata.engine.outputs import RequestOutput

    h, loop, stream = _handoff(0.0)
    first, last, detok = _deferred_pair()
    h.deliver_all([(stream, first)], urgent=True)
    assert detok.num_added == 0  # nothing resolved on the engine thread
    loop.run()
    h.deliver_all([(stream, last)], urgent=True)
    loop.run()
    got = _taken(stream)
    assert [type(o) for o in got] == [RequestOutput, RequestOutput]
    assert [o.outputs[0].token_ids for o in got] == [[5, 6], [5, 6, 7]]
    assert got[1].finished and got[1].outputs[0].finish_reason == "length" and detok.num_added == 3


def test_outputs_taken_in_one_wake_reach_the_stream_as_one():
    """What the stream's consumer would make of them (RequestStream merges the outputs waiting together)."""
    h, loop, stream = _handoff(0.0)
    other = asyncio.run(_stream("o"))
    first, last, detok = _deferred_pair()
    h.deliver_all([(stream, first), (other, "o1")])
    h.deliver_all([(other, "o2"), (stream, last)], urgent=True)
    loop.run()
    [out] = _taken(stream)
    assert out.outputs[0].token_ids == [5, 6, 7] and out.finished and detok.num_added == 3
    assert _taken(other) == ["o1", "o2"]


def test_an_item_between_deferred_outputs_keeps_its_place():
    from strata.server.request_stream import RequestFailedError

    h, loop, stream = _handoff(0.0)
    first, last, _ = _deferred_pair()
    err = RequestFailedError("x")
    h.deliver_all([(stream, first), (stream, err), (stream, last)], urgent=True)
    loop.run()
    got = _taken(stream)
    assert [type(o).__name__ for o in got] == ["RequestOutput", "RequestFailedError", "RequestOutput"]
    assert got[0].outputs[0].token_ids == [5, 6] and got[1] is err


def test_an_output_that_fails_to_resolve_fails_its_request_alone():
    from strata.engine.detokenizer import IncrementalDetokenizer
    from strata.engine.outputs import DeferredOutput
    from strata.engine.sampling_params import SamplingParams
    from strata.engine.sequence import Sequence
    from strata.server.request_stream import RequestFailedError

    class Broken:
        def decode(self, ids, skip_special_tokens):
            raise ValueError("bad token")

    aborted = []
    h, loop, stream = _handoff(0.0)
    stream.owner.abort = aborted.append
    other = asyncio.run(_stream("o"))
    seq = Sequence("r", [1, 2], SamplingParams())
    seq.token_ids.append(5)
    bad = DeferredOutput([seq], [(IncrementalDetokenizer(Broken(), [1, 2], [], True), [5], 1, False, None, None,
                                  None)], False, 0, None, None)
    h.deliver_all([(stream, bad), (other, "fine")], urgent=True)
    loop.run()
    [err] = _taken(stream)
    assert isinstance(err, RequestFailedError) and "bad token" in str(err) and aborted == ["r"]
    assert _taken(other) == ["fine"]
