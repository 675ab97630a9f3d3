"""The image config's `[daemon]` and what it becomes in the system's /etc/recovery/system.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mkimage.config import load_config
from mkimage.system import _system_toml
from recovery.core.errors import Rejected
from recovery.updated.sysconfig import SystemConfig


def test_the_demo_listens_on_tcp_and_checks_the_demo_feed() -> None:
    config = load_config(None)
    assert (config.daemon.listen, config.daemon.feed) == ("0.0.0.0:8080", "http://10.0.2.100/")
    system = SystemConfig.from_dict(tomllib.loads(_system_toml(config)))
    assert system.daemon.listen == ("0.0.0.0", 8080) and system.daemon.feed == "http://10.0.2.100/"
    assert str(system.daemon.socket) == "/run/reflash/reflashd.sock"


def test_an_empty_daemon_table_leaves_the_listener_off(tmp_path: Path) -> None:
    path = tmp_path / "image.toml"
    path.write_text('[daemon]\nlisten = ""\nfeed = ""\n')
    config = load_config(path)
    text = _system_toml(config)
    assert "[daemon]" not in text
    assert SystemConfig.from_dict(tomllib.loads(text)).daemon.listen is None


@pytest.mark.parametrize("table, words", [
    ('listen = "8080"', "daemon.listen '8080': HOST:PORT"),
    ('listen = "host:99999"', "HOST:PORT"),
    ('feed = 3', "must be strings"),
    ('feed = "http://x/\\"y"', "must not contain quotes"),
    ('port = 1', "unknown key daemon.port"),
])
def test_a_bad_daemon_table_is_one_line(tmp_path: Path, table: str, words: str) -> None:
    path = tmp_path / "image.toml"
    path.write_text(f"[daemon]\n{table}\n")
    with pytest.raises(Rejected, match=words):
        load_config(path)


@pytest.mark.parametrize("listen, words", [("8080", "HOST:PORT"), ("[::1]:0", "HOST:PORT"), (3, "HOST:PORT")])
def test_the_system_refuses_a_bad_listen(listen: object, words: str) -> None:
    with pytest.raises(Rejected, match=words):
        SystemConfig.from_dict({"product": "p", "daemon": {"listen": listen}})
