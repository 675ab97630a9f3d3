"""The guest network's host side without QEMU: the guestfwd options, and the relay QEMU starts per
connection, run as QEMU runs it (the connection on its stdin and stdout) against the static server."""

from __future__ import annotations

import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from vm.accel import Accel
from vm.demo import Narrator, line
from vm.machine import Machine
from vm.network import GuestForward, HostForward, StaticServer, UserNetwork


def test_guestfwd_option_runs_the_relay_per_connection() -> None:
    fwd = GuestForward("10.0.2.100", 80, 8123)
    option = fwd.option()
    assert option.startswith("guestfwd=tcp:10.0.2.100:80-cmd:")
    command = shlex.split(option.removeprefix("guestfwd=tcp:10.0.2.100:80-cmd:").replace(",,", ","))
    assert command == fwd.relay_command()
    assert command[-2:] == ["127.0.0.1", "8123"] and Path(command[-3]).name == "network.py"


def test_commas_are_escaped_for_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.executable", "/opt/py,thon/bin/python3")
    option = GuestForward("10.0.2.100", 80, 8123).option()
    assert "/opt/py,,thon/bin/python3" in option and ",thon" not in option.replace(",,", "")


@pytest.mark.parametrize("addr, port", [("192.168.1.5", 80), ("10.0.2.100", 0), ("10.0.2.100", 70000)])
def test_bad_forwards_are_refused(addr: str, port: int) -> None:
    with pytest.raises(ValueError):
        GuestForward(addr, port, 8000)


def test_user_network_is_restricted_by_default() -> None:
    args = UserNetwork((GuestForward("10.0.2.100", 80, 8123),)).qemu_args()
    assert args[0] == "-netdev" and args[2:] == ["-device", "virtio-net-pci,netdev=net0"]
    options = args[1].split(",")
    assert options[:3] == ["user", "id=net0", "restrict=on"] and options[3].startswith("guestfwd=")


def test_host_forwards_listen_on_the_loopback_only() -> None:
    net = UserNetwork((GuestForward("10.0.2.100", 80, 8123),), host_forwards=(HostForward(18080, 8080),))
    options = net.qemu_args()[1].split(",")
    assert options[:3] == ["user", "id=net0", "restrict=on"]
    assert options[-1] == "hostfwd=tcp:127.0.0.1:18080-:8080"
    for bad in ((0, 8080), (18080, 65536)):
        with pytest.raises(ValueError):
            HostForward(*bad)


def test_machine_puts_the_network_on_its_command_line(tmp_path: Path) -> None:
    net = UserNetwork((GuestForward("10.0.2.100", 80, 8123),))
    m = Machine(kernel=tmp_path / "vmlinuz", network=net, workdir=tmp_path)
    m.accel = Accel.tcg
    argv = m.argv(tmp_path / "q", tmp_path / "c")
    assert "-nic" not in argv and argv[argv.index("-netdev") + 1] == net.qemu_args()[1]
    plain = Machine(kernel=tmp_path / "vmlinuz", network=False, workdir=tmp_path)
    plain.accel = Accel.tcg
    argv = plain.argv(tmp_path / "q", tmp_path / "c")
    assert argv[argv.index("-nic") + 1] == "none" and "-netdev" not in argv


def _through_relay(server: StaticServer, request: bytes) -> bytes:
    """One connection as QEMU makes it: a socket pair, the relay's stdin and stdout on one end."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(server.forward().relay_command(), stdin=theirs, stdout=theirs,
                                stderr=subprocess.DEVNULL)
        theirs.close()
        ours.sendall(request)
        ours.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := ours.recv(65536):
            data += chunk
        assert proc.wait(30) == 0
    return data


def test_relay_carries_many_connections_to_the_server(tmp_path: Path) -> None:
    (tmp_path / "releases.json").write_bytes(b'{"feed": 1}\n')
    (tmp_path / "big.bundle").write_bytes(bytes(range(256)) * 8192)  # 2 MiB, more than one relay chunk
    with StaticServer(tmp_path) as server:
        for _ in range(3):  # a guestfwd to a chardev would answer the first only
            reply = _through_relay(server, b"GET /releases.json HTTP/1.0\r\nHost: 10.0.2.100\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b'{"feed": 1}\n')
        reply = _through_relay(server, b"GET /big.bundle HTTP/1.0\r\n\r\n")
        assert reply.split(b"\r\n\r\n", 1)[1] == (tmp_path / "big.bundle").read_bytes()
        assert _through_relay(server, b"GET /absent HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        assert server.fetched("/big.bundle") and not server.fetched("/absent")
        assert [r.status for r in server.requests] == [200, 200, 200, 200, 404]
    assert server.host == "127.0.0.1"


def test_relay_to_nothing_closes_the_guest_connection(tmp_path: Path) -> None:
    with StaticServer(tmp_path) as server:
        port = server.port
    fwd = GuestForward("10.0.2.100", 80, port)  # the server is gone: connections are refused
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.run(fwd.relay_command(), stdin=theirs, stdout=theirs, stderr=theirs, timeout=30)
        theirs.close()
        assert proc.returncode == 1 and ours.recv(100) == b""  # not a traceback sent to the guest


def test_narrator_lines_carry_the_host_time() -> None:
    said: list[str] = []
    narrator = Narrator(said.append, started=0.0)
    stage = narrator.mark("boot", "demo-appliance 1.0.0 ready")
    assert stage.name == "boot" and stage.took == stage.at > 0
    assert said[0].startswith("demo: [") and said[0].endswith(f"demo-appliance 1.0.0 ready (+{stage.took:.1f} s)")
    assert line(12.34, "x") == "demo: [  12.3 s] x"


def test_narrator_never_says_a_stage_took_negative_time() -> None:
    # 25.76 rounds up to 25.8; a stage 30 ms later once printed "(+-0.0 s)", which the demo's own format forbids.
    ticks = iter([0.0, 25.76, 25.79, 40.0])
    said: list[str] = []
    narrator = Narrator(said.append, clock=lambda: next(ticks))
    first, second, third = (narrator.mark(name, name) for name in ("a", "b", "c"))
    assert (first.at, second.at, third.at) == (25.8, 25.8, 40.0)
    assert second.took == 0.0 and str(second.took) == "0.0"
    assert said[1] == "demo: [  25.8 s] b (+0.0 s)"
    assert said[2] == "demo: [  40.0 s] c (+14.2 s)"
