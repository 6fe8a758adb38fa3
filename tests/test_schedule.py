"""The llama.cpp engine's scheduler without weights: a recording executor stands in for llama.cpp
(request i ends after lengths[i] sampled tokens) and every step is checked: admission and refill in
window order, lowest free slot first; live slots contiguous in split streams; an even count of logit
rows; the schedule a pure function of the window. test_backends.py runs the same scheduler on the
real tiny models."""
from ensemble_instruct.backends.schedule import Scheduler
from ensemble_instruct.kvcache import N_UBATCH


def drive(prompts: list[int], lengths: list[int], parallel: int, layout: str, shared: int = 0, even_rows=True):
    """Run one window; returns one record per step: (admitted (seq, request), moves, entries,
    sampled (entry index, request), spare sequence)."""
    requests = [(i, list(range(100 * i, 100 * i + n)), 50) for i, n in enumerate(prompts)]
    sched = Scheduler(requests, parallel, layout, shared, even_rows)
    steps = []
    while sched.busy:
        admitted = [(s.seq, s.index) for s in sched.admit()]
        moves = sched.compact()
        step = sched.step()
        steps.append((admitted, moves, [tuple(e) for e in step.entries], [(k, s.index) for k, s in step.samples],
                      step.spare))
        for _, slot in step.samples:  # the executor: sample a token, end the request after its length
            slot.token, slot.n_gen = 9000 + slot.index, slot.n_gen + 1
            if slot.n_gen >= lengths[slot.index]:
                sched.release(slot)
    return steps


def live_slots(step) -> list[int]:
    return sorted({e[2] for e in step[2]} - {step[4]})


def test_requests_take_the_lowest_free_slot_in_window_order():
    steps = drive([3, 3, 3, 3, 3], [4, 1, 2, 5, 1], parallel=2, layout="unified")
    admitted = [a for s in steps for a in s[0]]
    assert [i for _, i in admitted] == [0, 1, 2, 3, 4]  # window order
    assert admitted[:2] == [(0, 0), (1, 1)]
    assert admitted[2] == (1, 2)  # request 1 ended first: its slot takes the next request
    assert {i for s in steps for _, i in s[3]} == set(range(5))  # every request sampled


def test_a_step_holds_each_slots_pending_tokens_in_slot_order():
    steps = drive([4, 2], [2, 2], parallel=2, layout="unified", even_rows=False)
    first = steps[0][2]
    # the whole prompts, logits for each prompt's last token only
    assert first == [(0, 0, 0, False), (1, 1, 0, False), (2, 2, 0, False), (3, 3, 0, True),
                     (100, 0, 1, False), (101, 1, 1, True)]
    assert steps[0][3] == [(3, 0), (5, 1)]
    assert steps[1][2] == [(9000, 4, 0, True), (9001, 2, 1, True)]  # then each slot's sampled token


def test_a_shared_prefix_is_not_decoded_again():
    steps = drive([6], [1], parallel=1, layout="unified", shared=4)
    assert steps[0][2] == [(4, 4, 0, False), (5, 5, 0, True)]


def test_split_streams_keep_the_live_slots_contiguous():
    lengths = [9, 2, 7, 3, 5, 1, 8, 4, 6, 2]
    steps = drive([2] * 10, lengths, parallel=4, layout="split")
    assert all(live_slots(s) == list(range(len(live_slots(s)))) for s in steps)
    assert any(s[1] for s in steps)  # slots did move into gaps
    assert len({len(live_slots(s)) for s in steps}) >= 3
    unified = drive([2] * 10, lengths, parallel=4, layout="unified")
    assert not any(s[1] for s in unified)  # one stream: nothing to move


def rows(step, layout):
    entries = step[2]
    if layout == "unified":
        return sum(e[3] for e in entries) if len(entries) <= N_UBATCH else 0
    firsts = {}
    for e in entries:
        firsts.setdefault(e[2], e)
    return sum(e[3] for e in firsts.values())


def test_an_odd_count_of_logit_rows_gets_one_more_that_is_never_sampled():
    for layout in ("split", "unified"):
        lengths = [5, 3, 8, 2, 6, 4, 7, 1, 9, 3, 2, 5]
        padded = drive([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], lengths, parallel=5, layout=layout)
        plain = drive([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], lengths, parallel=5, layout=layout, even_rows=False)
        # odd only where no row can be added: every one of the 5 slots decodes a single token
        assert all(rows(s, layout) < 3 or rows(s, layout) % 2 == 0
                   or len(live_slots(s)) == 5 and len(s[2]) == 5 for s in padded), layout
        assert any(rows(s, layout) >= 3 and rows(s, layout) % 2 for s in plain), layout
        # the same requests sample at the same steps: the extra row is never sampled
        assert [[i for _, i in s[3]] for s in padded] == [[i for _, i in s[3]] for s in plain]
        kinds = {"spare" if s[4] is not None else "prompt token" for s in padded
                 if sum(e[3] for e in s[2]) > len(s[3])}
        assert kinds == {"spare", "prompt token"}, (layout, kinds)
        for s in padded:
            if s[4] is not None:  # the spare sequence follows the live ones and is free
                assert s[4] == max(live_slots(s)) + 1 < 5


def test_the_schedule_is_a_pure_function_of_the_window():
    prompts, lengths = [3, 7, 2, 5, 4, 6, 1, 8], [6, 2, 9, 3, 5, 1, 7, 4]
    for layout in ("split", "unified"):
        first = drive(prompts, lengths, parallel=3, layout=layout, shared=1)
        assert drive(prompts, lengths, parallel=3, layout=layout, shared=1) == first
        # a window that follows another one starts from the same state: its schedule is the same
        drive([9, 9], [3, 3], parallel=3, layout=layout)
        assert drive(prompts, lengths, parallel=3, layout=layout, shared=1) == first
