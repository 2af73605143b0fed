"""HeldResults, the service's pure bookkeeping: holders, bytes, deferral under the cap, freeing."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from mm_scheduler_sglang.held import HeldResults


def test_entry_is_freed_when_its_last_holder_releases():
    held: HeldResults[str, None] = HeldResults(max_bytes=100)
    held.add("a", "img", "handle-img", 40)
    assert held.join("b", "img")
    assert held.release("a") == []
    assert held.held_bytes == 40
    assert held.release("b") == ["handle-img"]
    assert held.held_bytes == 0 and len(held) == 0 and held.holders() == set()


def test_consume_frees_only_the_consumed_key_and_keeps_the_holder_for_others():
    held: HeldResults[str, None] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 10)
    held.add("a", "y", "hy", 10)
    assert held.consume("a", "x") == "hx"
    assert held.consume("a", "x") is None  # consuming twice frees nothing twice
    assert held.holds("a", "y") and not held.holds("a", "x")
    assert held.release("a") == ["hy"]


def test_items_beyond_the_cap_are_deferred_and_admitted_in_arrival_order_when_room_frees():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "big", "h-big", 90)
    assert not held.fits(20)
    held.defer("b", "k1", 20, "payload-1")
    held.defer("c", "k2", 5, "payload-2")
    assert not held.fits(1)  # nobody overtakes the deferred ones
    assert held.admit() == []
    held.release("a")
    admitted = held.admit()
    assert [d.payload for d in admitted] == ["payload-1", "payload-2"]
    for d in admitted:
        held.admitted(d, f"h-{d.key}")
    assert held.held_bytes == 25
    assert held.entry("k1").holders == {"b"}


def test_admission_stops_at_the_first_deferral_that_does_not_fit():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 60)
    held.defer("b", "large", 50, "L")
    held.defer("c", "small", 10, "S")
    assert held.admit() == []  # "small" would fit but must not overtake "large"


def test_a_deferral_larger_than_the_cap_is_dropped_so_it_cannot_block_others():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 60)
    held.defer("b", "huge", 500, "H")
    held.defer("c", "small", 10, "S")
    assert [d.payload for d in held.admit()] == ["S"]
    assert not held.holds("b", "huge") and "b" not in held.holders()


def test_releasing_a_deferred_holder_withdraws_the_deferral():
    held: HeldResults[str, str] = HeldResults(max_bytes=10)
    held.add("a", "x", "hx", 10)
    held.defer("b", "y", 5, "Y")
    assert held.join("c", "y")
    held.release("b")
    assert held.is_deferred("y")
    held.release("c")
    assert not held.is_deferred("y") and held.deferred_count == 0


def test_admitted_without_a_handle_forgets_the_holders():
    held: HeldResults[str, str] = HeldResults(max_bytes=10)
    held.defer("b", "y", 5, "Y")
    (d,) = held.admit()
    held.admitted(d, None)
    assert held.entry("y") is None and held.holders() == set()


def test_clear_returns_every_handle_and_zeroes_the_bytes():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 10)
    held.add("b", "y", "hy", 20)
    held.defer("c", "z", 500, "Z")
    assert sorted(held.clear()) == ["hx", "hy"]
    assert held.held_bytes == 0 and held.holders() == set() and held.deferred_count == 0


def test_adding_a_key_twice_is_an_error():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 10)
    with pytest.raises(KeyError):
        held.add("b", "x", "hx2", 10)
    with pytest.raises(KeyError):
        held.defer("b", "x", 10, "X")


RIDS = st.sampled_from(["r0", "r1", "r2", "r3"])
KEYS = st.sampled_from(["k0", "k1", "k2", "k3", "k4"])


class HeldMachine(RuleBasedStateMachine):
    """Random sequences of what the service does; the model below is the specification."""

    def __init__(self) -> None:
        super().__init__()
        self.held: HeldResults[str, str] = HeldResults(max_bytes=50)
        self.model: dict[str, tuple[int, set[str]]] = {}  # key -> (nbytes, holders) for entries
        self.freed: list[str] = []
        self.serial = 0

    def _handle(self, key: str) -> str:
        self.serial += 1
        return f"{key}#{self.serial}"

    @rule(rid=RIDS, key=KEYS, nbytes=st.integers(1, 30))
    def arrive(self, rid, key, nbytes):
        if self.held.join(rid, key):
            if key in self.model:
                self.model[key][1].add(rid)
            return
        if self.held.fits(nbytes):
            self.held.add(rid, key, self._handle(key), nbytes)
            self.model[key] = (nbytes, {rid})
        else:
            self.held.defer(rid, key, nbytes, key)

    @rule()
    def admit(self):
        for d in self.held.admit():
            self.held.admitted(d, self._handle(d.key))
            self.model[d.key] = (d.nbytes, set(d.holders))

    @rule(rid=RIDS, key=KEYS)
    def consume(self, rid, key):
        was_entry_holder = key in self.model and rid in self.model[key][1]
        handle = self.held.consume(rid, key)
        if was_entry_holder:
            self.model[key][1].discard(rid)
            if not self.model[key][1]:
                del self.model[key]
                assert handle is not None and handle.startswith(key + "#")
                self.freed.append(handle)
                return
        assert handle is None

    @rule(rid=RIDS)
    def release(self, rid):
        expected = {k for k, (_, holders) in self.model.items() if holders == {rid}}
        freed = self.held.release(rid)
        assert {h.split("#")[0] for h in freed} == expected
        for key in list(self.model):
            self.model[key][1].discard(rid)
            if not self.model[key][1]:
                del self.model[key]
        self.freed.extend(freed)

    @invariant()
    def bytes_and_holders_match_the_model(self):
        assert self.held.held_bytes == sum(n for n, _ in self.model.values())
        assert self.held.held_bytes <= self.held.max_bytes
        assert self.held.keys() == set(self.model)
        for key, (_, holders) in self.model.items():
            assert self.held.entry(key).holders == holders
            assert all(self.held.holds(r, key) for r in holders)

    @invariant()
    def no_handle_is_freed_twice(self):
        assert len(self.freed) == len(set(self.freed))


TestHeldMachine = HeldMachine.TestCase
TestHeldMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_handles_of_a_request_are_its_entries_none_while_one_is_deferred_and_empty_for_a_stranger():
    held: HeldResults[str, str] = HeldResults(max_bytes=10)
    held.add("a", "x", "hx", 6)
    held.add("b", "y", "hy", 4)
    held.defer("b", "z", 5, "Z")
    assert held.handles_of("a") == ["hx"]
    assert held.handles_of("b") is None  # z is not even submitted: not ready
    assert held.handles_of("nobody") == []  # a request holding nothing waits for nothing


def test_admission_counts_what_is_held_and_what_it_admitted_before():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 40)
    held.add("b", "w", "hw", 50)
    held.defer("c", "y", 30, "Y")
    held.defer("d", "z", 40, "Z")
    held.release("b")  # 40 held: y fits (70), then z would make 110
    assert [d.payload for d in held.admit()] == ["Y"]
    assert held.is_deferred("z")


def test_adding_or_deferring_a_key_twice_names_the_key():
    held: HeldResults[str, str] = HeldResults(max_bytes=100)
    held.add("a", "x", "hx", 10)
    held.defer("a", "big", 500, "B")
    with pytest.raises(KeyError, match="'x' is already held or deferred"):
        held.defer("b", "x", 10, "X")
    with pytest.raises(KeyError, match="'big' is already held or deferred"):
        held.add("b", "big", "hb", 10)
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        HeldResults(max_bytes=-1)


def test_a_zero_cap_is_allowed_and_defers_every_item():
    held: HeldResults[str, str] = HeldResults(max_bytes=0)  # --mm-coalescer-max-held-mb 0: no early results
    assert not held.fits(1)
    held.defer("a", "x", 1, "X")
    assert held.admit() == [] and held.deferred_count == 0  # larger than the cap: dropped, encoded at prefill
