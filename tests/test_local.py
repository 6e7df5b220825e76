"""nexusd.wire.local: what both sides read of the machine (peer credentials, file identity)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from nexusd.wire.local import file_id, peer_cred


def test_peer_cred_names_the_process_at_the_other_end() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_cred(a) == (os.getpid(), os.getuid(), os.getgid())


def test_file_id_is_shared_by_every_name_of_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    os.link(f, tmp_path / "hard")
    (tmp_path / "soft").symlink_to(f)
    other = tmp_path / "other"
    other.write_text("x")
    ids = {file_id(tmp_path / n) for n in ("f", "hard", "soft")}
    assert len(ids) == 1 and None not in ids
    assert file_id(other) not in ids
    assert file_id(tmp_path / "missing") is None
    with pytest.raises(OSError):  # not "missing": the caller words it
        file_id(f / "below-a-file")
