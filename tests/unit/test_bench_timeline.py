"""The recovery-phase timeline: console lines stamped as they arrive, marks found in order, the kernel's
own clock used for its start, steps and the median run, the SVG plot, and the summary's verdicts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bench.host import Host
from bench.report import Results, figures, render
from bench.timeline import DOWNTIME_MARKS, DOWNTIME_OPTIONAL, DOWNTIME_STEPS, STEPS, DowntimeRun, LineClock, PhaseRun, median_run, svg

CONSOLE = [
    (1.0, b"SeaBIOS\r\nBooting from Hard Disk...\r\n"),
    (2.0, b"Loading the recovery OS (try 1)\r\n"),
    (9.0, b"[    0.000000] Linux version 6.1.0-56-amd64\r\n[    3.000000] Serial: 8250/16550 driver\r\n"),
    (17.0, b"recovery: star"),  # a line split across two reads keeps the time its end arrived
    (18.0, b"ting (try 1)\r\n"),
    (23.0, b"recovery: verifying\r\n"),
    (29.0, b"recovery: erasing\r\n"),
    (29.5, b"recovery: extracting\r\n"),
    (40.0, b"recovery: extracting 50% 38/76 MiB 3.6 MiB/s ETA 10 s\r\n"),
    (52.0, b"recovery: finishing\r\nrecovery: installed 2.0.0\r\n"),
    (52.5, b"recovery: rebooting\r\n"),
    (55.0, b"SeaBIOS\r\n"),
    (56.0, b"Loading the system\r\n"),
    (80.0, b"system demo-appliance 2.0.0 ready\r\n"),
]


def clock_for(console: list[tuple[float, bytes]]) -> LineClock:
    """A clock fed the console output, each piece arriving at its given second."""
    now = [0.0]
    clock = LineClock(now=lambda: now[0])
    for at, data in console:
        now[0] = at
        clock(data)
    return clock


def test_marks_in_order_with_the_kernel_clock() -> None:
    marks = clock_for(CONSOLE).marks()
    assert marks["grub_recovery"] == 2.0
    # the first kernel line arrived at 9.0 with stamp 0.0, the second at 9.0 with 3.0: started at 6.0
    assert marks["kernel"] == 6.0
    assert marks["starting"] == 18.0
    assert marks["extracting"] == 29.5  # the bare step line, not a progress line
    assert (marks["finishing"], marks["rebooting"], marks["grub_system"], marks["ready"]) == (52.0, 52.5, 56.0, 80.0)
    run = PhaseRun(marks=marks, guest_seconds={})
    assert run.phase == 54.0
    assert abs(sum(run.step(name) for name, _, _ in STEPS) - run.phase) < 1e-9
    assert run.step("extract") == 22.5 and run.step("system boot") == 24.0


def test_missing_mark_ends_the_search() -> None:
    marks = clock_for([c for c in CONSOLE if b"erasing" not in c[1]]).marks()
    assert "verifying" in marks and "erasing" not in marks and "ready" not in marks


def _run(phase_scale: float) -> PhaseRun:
    marks = clock_for(CONSOLE).marks()
    base = marks["grub_recovery"]
    return PhaseRun({k: base + (v - base) * phase_scale for k, v in marks.items()}, {"extract": 20.0})


def test_median_run_and_svg() -> None:
    runs = [_run(1.2), _run(0.9), _run(1.0)]
    assert median_run(runs) is runs[2]
    doc = svg(runs[2], "title & <more>")
    root = ET.fromstring(doc)  # well-formed, escaped
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "extract" in texts and "22.5 s" in texts and "recovery phase 54.0 s" in texts
    rects = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(rects) == len(STEPS) + 1


HOST = Host(when="now", cpu="Test CPU", cores=2, memory=2**34, kernel="6.1", python="3.11", tar="tar", zstd="zstd",
            load=(1.0, 1.0, 1.0))


def test_summary_marks_missed_goals() -> None:
    fast, slow = Results(host=HOST, phase=[_run(1.0)]), Results(host=HOST, phase=[_run(1.5)])
    phase = [f for f in figures(fast) if f.figure.startswith("recovery phase")][0]
    assert phase.met is True and phase.measured.startswith("54.0 s")
    slow_phase = [f for f in figures(slow) if f.figure.startswith("recovery phase")][0]
    assert slow_phase.met is False  # 81 s > 60 s
    text = render(slow)
    assert "**MISSED**" in text and "Goals missed: recovery phase" in text
    assert "Test CPU, 2 CPUs" in text and "| extract: " in text
    assert [f.met for f in figures(slow) if not f.figure.startswith("recovery phase")] == [None] * 12


DOWNTIME = [
    (0.0, b"system demo-appliance 1.0.0 ready\r\n"),
    (5.0, b"rebooting into the recovery to install it\r\n"),
    (9.0, b"[   30.000000] reboot: Restarting system\r\n"),
    (10.5, b"\x1b[2;24HGNU GRUB  version 2.06-13+deb12u2\r\n"),
    *[(at + 10.0, data) for at, data in CONSOLE[1:11]],  # GRUB's choice at 12.0 ... `installed` at 62.0
    (62.5, b"recovery: rebooting\r\n[   70.000000] reboot: Restarting system\r\n"),
    (66.0, b"Loading the system\r\n"),
    (90.0, b"system demo-appliance 2.0.0 ready\r\n"),
]


def test_downtime_marks_steps_and_report() -> None:
    marks = clock_for(DOWNTIME).marks(DOWNTIME_MARKS)
    assert [name for name, _ in DOWNTIME_MARKS if name not in marks] == []
    run = DowntimeRun("bios", marks)
    assert (run.step("shutdown"), run.step("firmware"), run.step("menu")) == (4.0, 1.5, 1.5)
    assert run.marks["kernel"] == 16.0 and run.step("extract") == 22.5
    assert run.to_verdict == 57.0 and run.to_ready == 85.0
    assert abs(sum(run.step(name) for name, *_ in DOWNTIME_STEPS) - run.to_ready) < 1e-9
    results = Results(host=HOST, downtime=[run, DowntimeRun("uefi", {**marks, "ready": 60.0 + 5.0})])
    met = {f.figure: f.met for f in figures(results) if f.figure.startswith("downtime")}
    assert met == {
        "downtime under TCG, bios: the running system's reboot to the recovery's verdict": False,
        "downtime under TCG, bios: the running system's reboot to `system … ready` of the new release": False,
        "downtime under TCG, uefi: the running system's reboot to the recovery's verdict": False,
        "downtime under TCG, uefi: the running system's reboot to `system … ready` of the new release": True,
    }
    text = render(results)
    assert "**BIOS**, 1 runs, into the recovery through the firmware and GRUB:" in text and "| shutdown: the running system stops" in text
    assert "| **reboot to `ready`** | | **85.0** |" in text


def test_downtime_by_kexec_skips_the_firmware_and_grub_steps() -> None:
    """The running system kexecs into the recovery: no reset, no GRUB on the way in, still a whole run."""
    console = [c for c in DOWNTIME if c[0] not in (9.0, 10.5, 12.0)]  # the reset, GRUB's menu, its choice
    marks = clock_for(console).marks(DOWNTIME_MARKS, optional=DOWNTIME_OPTIONAL)
    run = DowntimeRun("bios", marks)
    assert run.kexec and "reset" not in marks and marks["reset_recovery"] == 62.5
    assert run.step("firmware") is None and run.step("menu") is None and run.step("load") is None
    assert run.step("shutdown") == 16.0 - 5.0  # the reboot line to the recovery kernel's start
    text = render(Results(host=HOST, downtime=[run]))
    assert "into the recovery by kexec" in text and "| firmware: " in text and "| – | – | – |" in text
