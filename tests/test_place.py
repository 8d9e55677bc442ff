"""Pure placement: ordering, packing, headroom, multi-GPU, starvation, and a 1,000 x 64 property check."""

from __future__ import annotations

import random

import pytest

from lora_farm.errors import NoCapacity
from lora_farm.scheduler.place import (GpuSnapshot, Placement, QueuedJob, Reservation,
                                       check_fits_farm, place)
from lora_farm.scheduler.policy import Policy

GIB = 1024.0
POLICY = Policy(headroom=0.2, max_jobs_per_gpu=8, starvation_seconds=600, cpu_slot_jobs=1)
NOW = 10_000.0


def card(uuid: str, total_gb: float = 24, free_gb: float | None = None, host: str = "h1") -> GpuSnapshot:
    free = total_gb if free_gb is None else free_gb
    return GpuSnapshot(uuid=uuid, host=host, total_mb=total_gb * GIB, free_mb=free * GIB)


def job(job_id: str, gb: float, priority: int = 0, age: float = 0, gpus: int = 1) -> QueuedJob:
    return QueuedJob(job_id=job_id, priority=priority, submitted_at=NOW - age, estimate_mb=gb * GIB,
                     gpus=gpus)


def by_job(placements: list[Placement]) -> dict[str, list[str]]:
    return {p.job_id: p.gpu_uuids for p in placements}


def test_a_job_fits_when_free_minus_headroom_minus_reserved_covers_it():
    # 24 GiB card, 20% headroom -> 19.2 GiB plannable; 10 GiB already reserved -> 9.2 left
    reserved = [Reservation("running", "gpu0", 10 * GIB)]
    assert by_job(place([job("fits", 9.2)], [card("gpu0")], reserved, POLICY, NOW)) == {"fits": ["gpu0"]}
    assert place([job("too-big", 9.3)], [card("gpu0")], reserved, POLICY, NOW) == []


def test_measured_free_memory_binds_when_something_else_uses_the_card():
    # a foreign process holds 12 GiB: free 12, minus 4.8 headroom -> 7.2 usable, no reservation of ours
    gpus = [card("gpu0", 24, free_gb=12)]
    assert place([job("big", 8)], gpus, [], POLICY, NOW) == []
    assert by_job(place([job("small", 7)], gpus, [], POLICY, NOW)) == {"small": ["gpu0"]}


def test_our_own_running_job_is_not_counted_twice():
    # our job reserved 8 GiB and is at its peak: NVML free already excludes it (24 - 8 = 16)
    gpus = [card("gpu0", 24, free_gb=16)]
    reserved = [Reservation("running", "gpu0", 8 * GIB)]
    # planned 19.2 - 8 = 11.2 and measured 16 - 4.8 = 11.2: an 11 GiB job fits
    assert by_job(place([job("next", 11)], gpus, reserved, POLICY, NOW)) == {"next": ["gpu0"]}


def test_higher_priority_first_then_oldest_first():
    jobs = [job("low-old", 15, priority=0, age=100), job("high-new", 15, priority=5, age=1),
            job("high-old", 15, priority=5, age=50)]
    placements = place(jobs, [card("gpu0"), card("gpu1")], [], POLICY, NOW)
    assert [p.job_id for p in placements] == ["high-old", "high-new"]


def test_jobs_spread_over_idle_cards_before_sharing_one():
    # two idle cards: the first two jobs get a card each, the third packs (best fit)
    jobs = [job(f"j{i}", 2, age=10 - i) for i in range(3)]
    placements = by_job(place(jobs, [card("gpu0"), card("gpu1")], [], POLICY, NOW))
    assert placements["j0"] != placements["j1"]
    assert sorted(uuid for uuids in placements.values() for uuid in uuids) == ["gpu0", "gpu0", "gpu1"]


def test_an_idle_card_wins_over_a_busy_one_that_fits_tighter():
    reserved = [Reservation("a", "gpu0", 15 * GIB)]
    placed = by_job(place([job("j", 4)], [card("gpu0"), card("gpu1")], reserved, POLICY, NOW))
    assert placed == {"j": ["gpu1"]}


def test_the_smallest_idle_card_that_fits_is_taken():
    gpus = [card("big", 80), card("small", 24)]
    assert by_job(place([job("j", 10)], gpus, [], POLICY, NOW)) == {"j": ["small"]}


def test_packing_prefers_the_fullest_busy_card_when_no_idle_card_fits():
    reserved = [Reservation("a", "gpu0", 15 * GIB), Reservation("b", "gpu1", 5 * GIB)]
    placed = by_job(place([job("j", 4)], [card("gpu0"), card("gpu1")], reserved, POLICY, NOW))
    assert placed == {"j": ["gpu0"]}  # 19.2 - 15 = 4.2 left: the tightest fit


def test_while_a_multi_card_job_waits_small_jobs_pack_and_keep_cards_whole():
    # the 2-card job does not fit yet (gpu0 busy with 15 GiB); small jobs must not break gpu1/gpu2
    reserved = [Reservation("running", "gpu0", 15 * GIB)]
    jobs = [job("pair", 18, priority=5, gpus=2), job("small", 2)]
    gpus = [card("gpu0"), card("gpu1"), card("gpu2", host="h2")]
    assert by_job(place(jobs, gpus, reserved, POLICY, NOW)) == {"small": ["gpu0"]}


def test_backfill_places_smaller_jobs_behind_one_that_does_not_fit():
    jobs = [job("big", 18, priority=9), job("small", 3)]
    reserved = [Reservation("running", "gpu0", 5 * GIB)]
    assert by_job(place(jobs, [card("gpu0")], reserved, POLICY, NOW)) == {"small": ["gpu0"]}


def test_max_jobs_per_gpu_limits_sharing():
    policy = Policy(headroom=0.2, max_jobs_per_gpu=2)
    reserved = [Reservation("r1", "gpu0", 2 * GIB)]
    placements = place([job("a", 1, age=3), job("b", 1, age=2), job("c", 1, age=1)],
                       [card("gpu0"), card("gpu1")], reserved, policy, NOW)
    # a spreads to the idle gpu1, b packs onto gpu0 (the fuller), c finds gpu0 full (2 jobs)
    assert by_job(placements) == {"a": ["gpu1"], "b": ["gpu0"], "c": ["gpu1"]}


def test_headroom_comes_from_the_policy():
    assert place([job("j", 20)], [card("gpu0")], [], Policy(headroom=0.2), NOW) == []
    assert by_job(place([job("j", 20)], [card("gpu0")], [], Policy(headroom=0.1), NOW)) == {"j": ["gpu0"]}


def test_multi_gpu_job_takes_idle_whole_cards_on_one_host():
    gpus = [card("a0", host="a"), card("a1", host="a"), card("b0", host="b"), card("b1", host="b"),
            card("b2", host="b")]
    reserved = [Reservation("busy", "a1", 1 * GIB)]  # host a has one idle card left
    placed = by_job(place([job("ddp", 10, gpus=2)], gpus, reserved, POLICY, NOW))
    assert len(placed["ddp"]) == 2
    assert set(placed["ddp"]) <= {"b0", "b1", "b2"}


def test_multi_gpu_job_prefers_the_host_it_fills_best():
    gpus = [card("a0", host="a"), card("a1", host="a"), card("b0", host="b"), card("b1", host="b"),
            card("b2", host="b")]
    assert sorted(by_job(place([job("ddp", 10, gpus=2)], gpus, [], POLICY, NOW))["ddp"]) == ["a0", "a1"]


def test_multi_gpu_job_waits_when_no_host_has_enough_idle_cards():
    gpus = [card("a0", host="a"), card("b0", host="b")]
    assert place([job("ddp", 1, gpus=2)], gpus, [], POLICY, NOW) == []


def test_cards_of_a_multi_gpu_job_stay_whole():
    gpus = [card("a0"), card("a1"), card("a2")]
    ddp = [Reservation("ddp", "a0", 4 * GIB), Reservation("ddp", "a1", 4 * GIB)]
    # best fit would pick a0/a1 (in use, fullest): they belong to the ddp job while it runs
    placed = by_job(place([job("s1", 2), job("s2", 2)], gpus, ddp, POLICY, NOW))
    assert placed == {"s1": ["a2"], "s2": ["a2"]}
    assert place([job("s", 1)], gpus[:2], ddp, POLICY, NOW) == []  # no whole card free: it waits
    # a ddp job placed in this pass keeps its cards whole too
    placed = by_job(place([job("ddp2", 4, gpus=2, priority=5), job("small", 1)],
                          [card("b0"), card("b1")], [], POLICY, NOW))
    assert sorted(placed["ddp2"]) == ["b0", "b1"] and "small" not in placed
    # a single-card job's card is shared when no idle card is left
    shared = [Reservation("one", "a0", 4 * GIB)]
    assert by_job(place([job("s", 1)], gpus[:1], shared, POLICY, NOW)) == {"s": ["a0"]}


def test_a_job_never_lands_where_it_is_already_reserved():
    reserved = [Reservation("j", "gpu0", 2 * GIB)]
    assert place([job("j", 2)], [card("gpu0")], reserved, POLICY, NOW) == []


def test_starving_large_job_holds_the_card_that_drains_soonest():
    # gpu0 has 12 GiB reserved, gpu1 4 GiB; the big job (16 GiB) fits neither now.
    gpus, reserved = [card("gpu0"), card("gpu1")], [Reservation("r0", "gpu0", 12 * GIB),
                                                    Reservation("r1", "gpu1", 4 * GIB)]
    smalls = [job(f"s{i}", 2, priority=5, age=1) for i in range(4)]
    fresh = place([job("big", 16, age=60)] + smalls, gpus, reserved, POLICY, NOW)
    assert "gpu1" in {u for p in fresh for u in p.gpu_uuids}  # not starving yet: smalls go anywhere
    starved = place([job("big", 16, age=601)] + smalls, gpus, reserved, POLICY, NOW)
    assert starved and all(p.gpu_uuids == ["gpu0"] for p in starved)  # gpu1 is held for big
    # once gpu1 drains, big runs there before anything else
    drained = place([job("big", 16, age=700)] + smalls, gpus, reserved[:1], POLICY, NOW)
    assert drained[0] == Placement("big", ["gpu1"])


def test_a_requeued_job_waits_from_when_it_reentered_the_queue():
    """Submitted long ago but requeued a second ago (an OOM retry): not starving, so it does
    not jump ahead of a higher-priority job; once it has waited again it does."""
    import dataclasses

    old = dataclasses.replace(job("retried", 15, age=9999), queued_at=NOW - 1)
    placed = place([old, job("urgent", 15, priority=5)], [card("gpu0")], [], POLICY, NOW)
    assert [p.job_id for p in placed] == ["urgent"]
    waited = dataclasses.replace(old, queued_at=NOW - 601)
    placed = place([waited, job("urgent", 15, priority=5)], [card("gpu0")], [], POLICY, NOW)
    assert [p.job_id for p in placed] == ["retried"]


def test_starving_job_goes_before_higher_priority_ones():
    jobs = [job("urgent", 15, priority=50, age=1), job("old", 15, priority=0, age=601)]
    assert place(jobs, [card("gpu0")], [], POLICY, NOW) == [Placement("old", ["gpu0"])]


def test_starving_job_that_can_never_fit_holds_nothing():
    placed = place([job("huge", 30, age=9999), job("small", 1)], [card("gpu0")], [], POLICY, NOW)
    assert placed == [Placement("small", ["gpu0"])]


def test_starving_multi_gpu_job_holds_cards_on_one_host():
    gpus = [card("a0", host="a"), card("a1", host="a"), card("a2", host="a")]
    reserved = [Reservation("r", "a0", 1 * GIB)]
    jobs = [job("ddp", 10, gpus=3, age=601), job("small", 1, age=1)]
    assert place(jobs, gpus, reserved, POLICY, NOW) == []  # every card is held for the DDP job


def test_cpu_slot_takes_any_size_up_to_its_job_count():
    slot = GpuSnapshot(uuid="cpu", host="h", total_mb=0, free_mb=0, cpu=True)
    placements = place([job("a", 50, age=2), job("b", 1, age=1)], [slot], [], POLICY, NOW)
    assert placements == [Placement("a", ["cpu"])]
    two = place([job("a", 50, age=2), job("b", 1, age=1)], [slot], [],
                Policy(cpu_slot_jobs=2), NOW)
    assert [p.job_id for p in two] == ["a", "b"]
    assert place([job("c", 1)], [slot], [Reservation("a", "cpu", 50 * GIB)], POLICY, NOW) == []


def test_check_fits_farm_refuses_with_the_figures():
    gpus = [card("gpu0", 24), card("gpu1", 16)]
    with pytest.raises(NoCapacity) as raised:
        check_fits_farm(30.2 * GIB, 1, gpus, POLICY)
    message = str(raised.value)
    assert "needs 30.2 GB" in message
    assert "largest card gpu0" in message and "24.0 GB" in message
    assert "19.2 GB usable with 20% headroom" in message and "Fix:" in message
    check_fits_farm(19 * GIB, 1, gpus, POLICY)  # fits the largest card: no error


def test_check_fits_farm_for_multi_gpu_counts_cards_per_host():
    gpus = [card("a0", host="a"), card("b0", host="b")]
    with pytest.raises(NoCapacity, match="most cards that fit it on one host is 1"):
        check_fits_farm(10 * GIB, 2, gpus, POLICY)
    check_fits_farm(10 * GIB, 2, gpus + [card("a1", host="a")], POLICY)


def test_check_fits_farm_on_cpu_slot():
    slot = GpuSnapshot(uuid="cpu", host="h", total_mb=0, free_mb=0, cpu=True)
    check_fits_farm(100 * GIB, 1, [slot], POLICY)  # the CPU slot is not limited by VRAM
    with pytest.raises(NoCapacity, match="only CPU slots"):
        check_fits_farm(1 * GIB, 2, [slot], POLICY)


def test_thousand_jobs_on_sixty_four_cards_never_overcommit():
    rng = random.Random(7)
    hosts = [f"host{h}" for h in range(8)]
    gpus = [GpuSnapshot(f"{host}-gpu{i}", host, rng.choice([24, 48, 80]) * GIB,
                        rng.choice([1.0, 1.0, 0.7]) * 80 * GIB) for host in hosts for i in range(8)]
    gpus = [GpuSnapshot(g.uuid, g.host, g.total_mb, min(g.free_mb, g.total_mb)) for g in gpus]
    reserved = [Reservation(f"run{i}", rng.choice(gpus).uuid, rng.uniform(1, 6) * GIB) for i in range(40)]
    jobs = [QueuedJob(f"j{i:04d}", rng.randint(-2, 2), NOW - rng.uniform(0, 1200),
                      rng.choice([0.6, 0.6, 2, 5, 12, 30, 60]) * GIB,
                      gpus=rng.choice([1] * 20 + [2, 4])) for i in range(1000)]
    placements = place(jobs, gpus, reserved, POLICY, NOW)
    assert len(placements) > 50
    assert len({p.job_id for p in placements}) == len(placements)
    _assert_within_capacity(placements, jobs, gpus, reserved, POLICY)


def _assert_within_capacity(placements, jobs, gpus, reserved, policy):
    estimate = {j.job_id: j for j in jobs}
    snapshot = {g.uuid: g for g in gpus}
    planned = {g.uuid: sum(r.mb for r in reserved if r.gpu_uuid == g.uuid) for g in gpus}
    added = {g.uuid: 0.0 for g in gpus}
    count = {g.uuid: len({r.job_id for r in reserved if r.gpu_uuid == g.uuid}) for g in gpus}
    for p in placements:
        queued = estimate[p.job_id]
        assert len(p.gpu_uuids) == queued.gpus
        assert len({snapshot[u].host for u in p.gpu_uuids}) == 1
        for uuid in p.gpu_uuids:
            if queued.gpus > 1:
                assert count[uuid] == 0, "a multi-GPU job takes idle whole cards"
            planned[uuid] += queued.estimate_mb
            added[uuid] += queued.estimate_mb
            count[uuid] += 1
    for uuid, g in snapshot.items():
        usable = g.total_mb * (1 - policy.headroom)
        assert planned[uuid] <= usable + 1e-6, uuid
        assert added[uuid] <= g.free_mb - g.total_mb * policy.headroom + 1e-6 or added[uuid] == 0
        assert count[uuid] <= policy.max_jobs_per_gpu


# ---- the policy file ---------------------------------------------------------------------------

def test_the_shipped_policy_file_loads(monkeypatch):
    from lora_farm.scheduler.policy import _REPO_POLICY, load_policy

    monkeypatch.delenv("LORAFARM_POLICY", raising=False)
    monkeypatch.delenv("LORAFARM_HEADROOM", raising=False)
    assert _REPO_POLICY.is_file()
    assert load_policy(_REPO_POLICY) == Policy(headroom=0.2, max_jobs_per_gpu=8,
                                               starvation_seconds=600, cpu_slot_jobs=1)


def test_policy_path_and_headroom_come_from_the_environment(tmp_path, monkeypatch):
    from lora_farm.scheduler.policy import load_policy

    path = tmp_path / "policy.yaml"
    path.write_text("headroom: 0.1\nmax_jobs_per_gpu: 3\n")
    monkeypatch.setenv("LORAFARM_POLICY", str(path))
    monkeypatch.delenv("LORAFARM_HEADROOM", raising=False)
    assert load_policy() == Policy(headroom=0.1, max_jobs_per_gpu=3)
    monkeypatch.setenv("LORAFARM_HEADROOM", "0.35")
    assert load_policy().headroom == 0.35


@pytest.mark.parametrize("text, words", [
    ("headroom: 1.5\n", ["`headroom`", "1.5"]),
    ("headroom: lots\n", ["`headroom`", "'lots'"]),
    ("max_jobs_per_gpu: 2.5\n", ["`max_jobs_per_gpu`", "integer"]),
    ("headrom: 0.2\n", ["unknown policy key", "headrom"]),
    ("- 1\n- 2\n", ["mapping"]),
])
def test_a_bad_policy_names_the_key_and_value(tmp_path, monkeypatch, text, words):
    from lora_farm.errors import ConfigError
    from lora_farm.scheduler.policy import load_policy

    monkeypatch.delenv("LORAFARM_HEADROOM", raising=False)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_policy(path)
    for word in words:
        assert word in str(raised.value)


def test_a_bad_headroom_variable_is_named(monkeypatch, tmp_path):
    from lora_farm.errors import ConfigError
    from lora_farm.scheduler.policy import load_policy

    monkeypatch.setenv("LORAFARM_HEADROOM", "twenty")
    with pytest.raises(ConfigError, match="LORAFARM_HEADROOM='twenty'"):
        load_policy(tmp_path / "absent.yaml")


# -- host RAM -----------------------------------------------------------------------------------

def ram_card(uuid: str, host: str, ram_gb: float | None, total_gb: float = 80) -> GpuSnapshot:
    return GpuSnapshot(uuid=uuid, host=host, total_mb=total_gb * GIB, free_mb=total_gb * GIB,
                       host_ram_mb=None if ram_gb is None else ram_gb * GIB)


def ram_job(job_id: str, ram_gb: float, gb: float = 10, gpus: int = 1, age: float = 0) -> QueuedJob:
    return QueuedJob(job_id=job_id, priority=0, submitted_at=NOW - age, estimate_mb=gb * GIB, gpus=gpus,
                     host_ram_mb=ram_gb * GIB)


def test_a_job_goes_to_a_host_with_the_ram_for_it():
    gpus = [ram_card("small0", "small", 64), ram_card("big0", "big", 256)]
    assert by_job(place([ram_job("video", 90)], gpus, [], POLICY, NOW)) == {"video": ["big0"]}
    assert place([ram_job("huge", 300)], gpus, [], POLICY, NOW) == []  # no host holds it: it waits


def test_the_jobs_of_a_host_share_its_ram_whatever_their_cards():
    gpus = [ram_card("a0", "a", 128), ram_card("a1", "a", 128)]  # VRAM for both, RAM for one
    placed = by_job(place([ram_job("first", 80, age=2), ram_job("second", 80, age=1)], gpus, [], POLICY, NOW))
    assert placed == {"first": ["a0"]}
    running = [Reservation("running", "a0", 10 * GIB, 100 * GIB)]  # on the host, whichever card
    assert by_job(place([ram_job("fits", 28)], gpus, running, POLICY, NOW)) == {"fits": ["a1"]}
    assert place([ram_job("no-room", 29)], gpus, running, POLICY, NOW) == []


def test_a_host_of_unknown_ram_is_not_limited():
    assert by_job(place([ram_job("any", 10_000)], [ram_card("gpu0", "h", None)], [], POLICY, NOW)) == {
        "any": ["gpu0"]}


def test_check_fits_farm_refuses_a_job_no_host_has_the_ram_for_with_the_figures():
    gpus = [ram_card("a0", "a", 64), ram_card("b0", "b", 128)]
    with pytest.raises(NoCapacity) as raised:
        check_fits_farm(30 * GIB, 1, gpus, POLICY, host_ram_mb=160 * GIB)
    message = str(raised.value)
    assert "160.0 GB of host RAM" in message and "largest host b has 128.0 GB" in message and "Fix:" in message
    check_fits_farm(30 * GIB, 1, gpus, POLICY, host_ram_mb=100 * GIB)  # host b holds it
    with pytest.raises(NoCapacity, match="needs 70.0 GB"):  # the RAM on b only, the VRAM on a only
        check_fits_farm(70 * GIB, 1, [ram_card("a0", "a", 64, 96), ram_card("b0", "b", 256, 80)], POLICY,
                        host_ram_mb=200 * GIB)
