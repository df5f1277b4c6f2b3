"""The roster's arithmetic on plain values (sweep/roster.py, sweep/rebalance.py): which entries count as live
workers, each worker's share of the waiting trials, and what the others hold beyond theirs. The workers
themselves are tested in test_sweep_workers.py."""

from __future__ import annotations

from collections import Counter

from sae_sweep.sweep.rebalance import Holdings
from sae_sweep.sweep.roster import is_live, share
from sae_sweep.sweep.store import this_process

NOW = 1_000_000.0


def test_the_share_is_an_even_split_of_the_unfinished_work_rounded_up():
    assert share(waiting=12, running=0, live=3) == 4
    assert share(waiting=10, running=0, live=3) == 4
    assert share(waiting=5, running=5, live=4) == 3  # the running trials count towards the split
    assert share(waiting=3, running=0, live=0) == 3  # no live worker counted yet: this one alone


def test_a_worker_may_claim_one_while_any_waits_and_none_when_none_waits():
    assert share(waiting=1, running=0, live=8) == 1
    assert share(waiting=0, running=5, live=2) == 0
    assert share(waiting=0, running=0, live=1) == 0


def test_the_share_is_never_more_than_what_waits():
    assert share(waiting=2, running=10, live=2) == 2
    assert share(waiting=7, running=0, live=1) == 7


def test_a_worker_that_left_is_not_live_even_with_a_fresh_beat():
    me = {**this_process(), "beat": NOW}
    assert is_live(me, grace_s=60, now=NOW)
    assert not is_live({**me, "left": NOW}, grace_s=60, now=NOW)


def test_a_worker_whose_beat_is_older_than_the_grace_period_is_not_live():
    other_machine = {"machine": "elsewhere", "host": "node7", "pid": 1, "start": 1.0, "beat": NOW - 61}
    assert not is_live(other_machine, grace_s=60, now=NOW)
    assert is_live(
        {**other_machine, "beat": NOW - 59}, grace_s=60, now=NOW
    )  # another machine: only beats tell
    assert not is_live({k: v for k, v in other_machine.items() if k != "beat"}, grace_s=60, now=NOW)


def test_a_worker_on_this_machine_whose_process_is_gone_is_not_live_despite_its_beat():
    reused_pid = {**this_process(), "start": "an earlier process with this pid", "beat": NOW}
    assert not is_live(reused_pid, grace_s=60, now=NOW)


def test_the_fair_holding_is_each_live_workers_share_of_the_unfinished_trials():
    assert Holdings(takeable=3, running=9, live=4, held=Counter()).fair == 3
    assert Holdings(takeable=0, running=10, live=4, held=Counter()).fair == 3
    assert Holdings(takeable=0, running=0, live=2, held=Counter()).fair == 1  # at least one
    assert Holdings(takeable=5, running=0, live=0, held=Counter()).fair == 5


def test_over_counts_only_what_the_other_workers_hold_beyond_their_share():
    h = Holdings(takeable=0, running=12, live=3, held=Counter(a=7, b=3, c=2))  # fair share: 4
    assert h.over("me") == 3  # a's 3 beyond its 4; b and c hold less, which does not offset it
    assert h.over("a") == 0  # a's own excess is not the others'
    assert Holdings(takeable=0, running=12, live=3, held=Counter(a=6, b=6)).over("c") == 4
