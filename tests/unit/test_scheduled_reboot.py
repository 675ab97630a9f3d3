"""The daemon's scheduled reboot follows the wall clock (recovery/updated/api.py Service): the loop's
timers are monotonic, and an appliance's clock is often set after it booted (NTP, a wrong RTC)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

from recovery.updated.api import Service
from recovery.updated.servicestate import ServiceState

START = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


class Wall:
    """A wall clock the test sets, as NTP or `date` would."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def _service(tmp_path: Path, wall: Wall, reboots: list[datetime]) -> Service:
    instruction = tmp_path / "update-instruction"
    instruction.write_bytes(b"staged")
    saved: list[ServiceState] = []
    ops = SimpleNamespace(config=SimpleNamespace(instruction=instruction),
                          state=lambda: ServiceState(None, (START + timedelta(hours=1)).isoformat()),
                          _save=saved.append)
    return Service(ops, reboot=lambda: reboots.append(wall()), clock=wall, recheck=0.02)  # type: ignore[arg-type]


def test_a_clock_set_forward_reboots_at_the_chosen_wall_time_not_an_hour_late(tmp_path: Path) -> None:
    wall, reboots = Wall(), []

    async def run() -> None:
        service = _service(tmp_path, wall, reboots)
        service.schedule_reboot(START + timedelta(hours=1))
        await asyncio.sleep(0.2)
        assert reboots == []  # an hour to go
        wall.now = START + timedelta(hours=2)  # the clock is set: the chosen time has passed
        for _ in range(50):
            await asyncio.sleep(0.02)
            if reboots:
                break

    asyncio.run(run())
    assert reboots == [START + timedelta(hours=2)]


def test_a_clock_set_back_waits_for_the_chosen_wall_time(tmp_path: Path) -> None:
    wall, reboots = Wall(), []
    wall.now = START + timedelta(minutes=59, seconds=59, microseconds=900_000)

    async def run() -> None:
        service = _service(tmp_path, wall, reboots)
        service.schedule_reboot(START + timedelta(hours=1))  # 0.1 s to go on the monotonic clock
        wall.now = START  # set back an hour
        await asyncio.sleep(0.3)
        assert reboots == []
        wall.now = START + timedelta(hours=1)
        for _ in range(50):
            await asyncio.sleep(0.02)
            if reboots:
                break
        service.cancel_reboot()

    asyncio.run(run())
    assert reboots == [START + timedelta(hours=1)]


def test_a_cancelled_schedule_never_reboots(tmp_path: Path) -> None:
    wall, reboots = Wall(), []

    async def run() -> None:
        service = _service(tmp_path, wall, reboots)
        service.schedule_reboot(START + timedelta(seconds=1))
        await asyncio.sleep(0.1)
        service.cancel_reboot()
        wall.now = START + timedelta(hours=1)
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert reboots == []
