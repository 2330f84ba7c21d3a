"""Packing as a pure function over many box shapes, the makespan bound, and the run lock."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest
from fixtures.nvml.fake import FakePynvml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.host.devices import Nvml, host_devices
from harness.run.packing import (
    DevicesLocked,
    Job,
    Slot,
    choose_gpus,
    device_lock_keys,
    lock_devices,
    lower_bound,
    next_assignments,
    simulate,
    slots_from_devices,
    unrunnable,
)

ALL8 = frozenset(range(8))


def dgx(n=8):
    """One NVSwitch island, the first half of the GPUs on NUMA node 0, the rest on node 1."""
    return [Slot(i, numa_node=i * 2 // n, island=0) for i in range(n)]


def job(id, tp, est=None, eligible=ALL8):
    return Job(id, tp, frozenset(eligible), est)


# --------------------------------------------------------------------------- GPU choice
def test_tp4_stays_on_one_numa_node():
    assert choose_gpus(dgx(), 4) == (0, 1, 2, 3)
    free = [s for s in dgx() if s.index != 1]
    assert choose_gpus(free, 4) == (4, 5, 6, 7)


def test_best_fit_island_keeps_the_big_island_whole():
    slots = [Slot(i, island=0) for i in (0, 1, 2)] + [Slot(i, island=1) for i in (4, 5, 6, 7)]
    assert choose_gpus(slots, 2) == (0, 1)
    assert choose_gpus(slots, 4) == (4, 5, 6, 7)


def test_single_gpu_cells_go_to_gpus_outside_nvlink_first():
    slots = [Slot(0, island=0), Slot(1, island=0), Slot(2)]
    assert choose_gpus(slots, 1) == (2,)
    assert choose_gpus(slots, 2) == (0, 1)


def test_split_across_islands_only_when_no_island_fits():
    slots = [Slot(0, 0, island=0), Slot(1, 0, island=0), Slot(4, 1, island=1), Slot(5, 1, island=1)]
    assert choose_gpus(slots, 3) is not None and len(choose_gpus(slots, 3)) == 3
    assert choose_gpus(slots, 5) is None


def test_slots_from_recorded_inventory():
    slots = slots_from_devices(host_devices(Nvml.open(FakePynvml("h100x8_nvswitch"))))
    assert slots == dgx()
    pcie = slots_from_devices(host_devices(Nvml.open(FakePynvml("rtx4090x2_pcie"))))
    assert pcie == [Slot(0), Slot(1)]


# --------------------------------------------------------------------------- policy
def test_assignments_are_disjoint_and_skip_busy_gpus():
    pending = [job(f"j{i}", tp) for i, tp in enumerate([4, 2, 1, 1, 1])]
    started = next_assignments(pending, dgx(), busy={0, 1})
    used = [g for _, gpus in started for g in gpus]
    assert len(used) == len(set(used)) and not set(used) & {0, 1}
    assert sorted(used) == [2, 3, 4, 5, 6, 7]
    assert "j4" not in {j.id for j, _ in started}  # 4 + 2 GPUs went to the bigger cells


def test_mixed_cards_only_get_their_selector_gpus():
    slots = [Slot(i) for i in range(4)]  # 0-1: H100, 2-3: L40S
    pending = [job("h", 1, 10, {0, 1}), job("l", 2, 10, {2, 3}), job("h2", 2, 5, {0, 1})]
    started = dict((j.id, g) for j, g in next_assignments(pending, slots))
    assert set(started["h"]) <= {0, 1} and started["l"] == (2, 3)
    assert "h2" not in started  # one H100 left; the L40S GPUs are not its kind


def test_longest_first_and_smaller_cells_backfill_behind_a_waiting_big_one():
    pending = [job("big", 8, 500), job("long1", 1, 300), job("short1", 1, 50), job("tp4", 4, 100)]
    started = {j.id: g for j, g in next_assignments(pending, dgx(), busy={0})}
    assert set(started) == {"long1", "short1", "tp4"}  # 7 free GPUs: none idles while "big" waits
    assert started["tp4"] == (4, 5, 6, 7)  # a whole NUMA node


def test_without_durations_bigger_cells_go_first():
    pending = [job("x", 1), job("y", 2), job("z", 4), job("w", 4)]
    started = {j.id for j, _ in next_assignments(pending, dgx(), busy={0, 1, 2})}
    assert started == {"w", "x"}  # 5 free: one TP=4 (ties by id), the TP=2 does not fit, TP=1 does
    started = {j.id for j, _ in next_assignments(pending, dgx(), busy={0, 1})}
    assert started == {"w", "y"}


def test_unrunnable_cells_are_reported_not_scheduled():
    slots = dgx(4)
    jobs = [job("tp8", 8, 10), job("ok", 4, 10), job("zero", 0, 10), job("wrong_card", 1, 10, {7})]
    assert {j.id for j in unrunnable(jobs, slots)} == {"tp8", "zero", "wrong_card"}
    schedule = simulate(jobs, slots)
    assert [p.job_id for p in schedule.placements] == ["ok"]
    assert set(schedule.unrunnable) == {"tp8", "zero", "wrong_card"}


# --------------------------------------------------------------------------- simulation
def assert_valid(schedule, jobs, slots, busy_until=None):
    by_id = {j.id: j for j in jobs}
    present = {s.index for s in slots}
    placed = [p.job_id for p in schedule.placements]
    assert sorted(placed) == sorted(j.id for j in jobs if j.id not in schedule.unrunnable)
    per_gpu = defaultdict(list)
    for gpu, until in (busy_until or {}).items():
        per_gpu[gpu].append((0.0, until))
    for p in schedule.placements:
        j = by_id[p.job_id]
        assert len(p.gpus) == len(set(p.gpus)) == j.gpus_needed
        assert set(p.gpus) <= j.eligible & present
        for g in p.gpus:
            per_gpu[g].append((p.start, p.end))
    for intervals in per_gpu.values():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert start >= end - 1e-9, "GPU double-booked"


# Recorded spawn-to-stop seconds of a mixed-TP matrix on an 8x H100 box: model x config.
RECORDED_8XH100 = [
    ("llama-3.1-8b", 1, [182, 175, 241, 198, 163, 210]),
    ("llama-3.1-8b", 2, [171, 166]),
    ("qwen2.5-7b", 1, [158, 149, 233, 171]),
    ("qwen2.5-14b", 1, [236, 251, 312]),
    ("qwen2.5-14b", 2, [205, 219]),
    ("mistral-small-24b", 2, [268, 281, 344]),
    ("qwen2.5-32b", 2, [341, 362]),
    ("qwen2.5-32b", 4, [289, 301, 355]),
    ("gemma-2-27b", 2, [322, 297]),
    ("deepseek-v2-lite", 1, [265, 240]),
    ("deepseek-v2-lite", 2, [231]),
    ("mixtral-8x7b", 4, [402, 388]),
    ("mixtral-8x7b-fp8", 2, [371]),
    ("llama-3.3-70b", 4, [512, 547, 603]),
    ("llama-3.3-70b", 8, [433, 451]),
    ("qwen2.5-72b", 4, [538, 566]),
    ("qwen2.5-72b", 8, [468]),
    ("qwen3-235b-a22b-fp8", 8, [884]),
    ("phi-3.5-mini", 1, [121, 118, 133, 127]),
    ("tinyllama", 1, [74, 69, 88, 71]),
]


def recorded_jobs():
    return [
        job(f"{model}-tp{tp}-{k}", tp, seconds) for model, tp, runs in RECORDED_8XH100 for k, seconds in enumerate(runs)
    ]


def test_recorded_mixed_tp_matrix_is_within_10_percent_of_the_bound():
    jobs = recorded_jobs()
    schedule = simulate(jobs, dgx())
    assert_valid(schedule, jobs, dgx())
    bound = lower_bound(jobs, 8, {j.id: j.est_s for j in jobs})
    assert schedule.makespan <= 1.10 * bound, (schedule.makespan, bound)
    # The one-cell-at-a-time runner this replaces: the sum of all durations.
    assert schedule.makespan < 0.5 * sum(j.est_s for j in jobs)


def test_recorded_matrix_with_estimates_off_by_30_percent():
    jobs = recorded_jobs()
    rng = random.Random(7)
    actual = {j.id: j.est_s * rng.uniform(0.7, 1.3) for j in jobs}
    schedule = simulate(jobs, dgx(), actual)
    assert_valid(schedule, jobs, dgx())
    assert schedule.makespan <= 1.15 * lower_bound(jobs, 8, actual)


def test_random_mixed_tp_matrices_on_8_gpus_stay_near_the_bound():
    ratios = []
    for seed in range(40):
        rng = random.Random(seed)
        jobs = [
            job(f"j{k}", rng.choice([1, 1, 1, 1, 2, 2, 4, 8]), rng.lognormvariate(5, 0.6))
            for k in range(rng.randint(30, 80))
        ]
        schedule = simulate(jobs, dgx())
        assert_valid(schedule, jobs, dgx())
        ratios.append(schedule.makespan / lower_bound(jobs, 8, {j.id: j.est_s for j in jobs}))
    assert sum(ratios) / len(ratios) <= 1.04
    assert max(ratios) <= 1.10


CARDS = {"H100": 0, "L40S": 1, "4090": 2}


@st.composite
def boxes(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    cards = draw(st.lists(st.sampled_from(list(CARDS)), min_size=n, max_size=n))
    islands = draw(st.lists(st.one_of(st.none(), st.integers(0, 1)), min_size=n, max_size=n))
    numa = draw(st.lists(st.one_of(st.none(), st.integers(0, 1)), min_size=n, max_size=n))
    slots = [Slot(i, numa[i], islands[i]) for i in range(n)]
    busy = draw(st.dictionaries(st.integers(0, n - 1), st.floats(1, 500), max_size=n))
    n_jobs = draw(st.integers(0, 25))
    jobs = []
    for k in range(n_jobs):
        card = draw(st.sampled_from(list(CARDS)))
        tp = draw(st.sampled_from([1, 1, 2, 4, 8]))
        est = draw(st.one_of(st.none(), st.floats(1, 1000)))
        jobs.append(Job(f"j{k}", tp, frozenset(i for i in range(n) if cards[i] == card), est))
    actual = {j.id: draw(st.floats(1, 1000)) for j in jobs}
    return slots, jobs, actual, busy


@settings(max_examples=300, deadline=None)
@given(boxes())
def test_any_box_any_matrix_never_double_books(box):
    slots, jobs, actual, busy = box
    schedule = simulate(jobs, slots, actual, busy_until=busy)
    assert_valid(schedule, jobs, slots, busy)
    runnable = [j for j in jobs if j.id not in schedule.unrunnable]
    if runnable:
        assert schedule.makespan >= lower_bound(runnable, len(slots), actual) - 1e-6


# --------------------------------------------------------------------------- run lock
def test_second_run_on_the_same_gpus_is_refused_with_the_holder(tmp_path):
    with lock_devices(["GPU-a", "GPU-b"], "run-1", tmp_path):
        with pytest.raises(DevicesLocked) as err:
            lock_devices(["GPU-b", "GPU-c"], "run-2", tmp_path)
        assert "GPU-b is in use by matrix run run-1" in str(err.value)
        # Disjoint GPUs: a second run may use them at the same time.
        with lock_devices(["GPU-c"], "run-3", tmp_path):
            pass
    with lock_devices(["GPU-b"], "run-4", tmp_path):
        pass


def test_refused_run_releases_what_it_had_taken(tmp_path):
    with lock_devices(["gpu1"], "run-1", tmp_path):
        with pytest.raises(DevicesLocked):
            lock_devices(["gpu0", "gpu1"], "run-2", tmp_path)
        lock_devices(["gpu0"], "run-3", tmp_path).release()


def test_lock_waits_for_a_finishing_run(tmp_path):
    first = lock_devices(["cpu"], "run-1", tmp_path)
    threading.Timer(0.3, first.release).start()
    t0 = time.monotonic()
    with lock_devices(["cpu"], "run-2", tmp_path, wait_s=5):
        assert time.monotonic() - t0 >= 0.25


def test_lock_of_a_dead_run_is_free(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from harness.run.packing import lock_devices; "
        f"lock_devices(['GPU-x'], 'other', Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DevicesLocked, match=f"pid {holder.pid}"):
            lock_devices(["GPU-x"], "mine", tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_devices(["GPU-x"], "mine", tmp_path).release()


def test_lock_keys_are_uuids_and_cpu():
    devices = host_devices(Nvml.open(FakePynvml("rtx4090x2_pcie")))
    keys = device_lock_keys(devices)
    assert keys[:2] == [d.uuid for d in devices[:2]] and keys[2] == "cpu"
