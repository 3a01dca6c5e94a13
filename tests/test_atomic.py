"""Files written through alkpu_plugin.atomic get the mode a plain open() would give them."""

import os
import stat

from alkpu_plugin.atomic import atomic_write, atomic_write_text


def test_written_files_have_the_umask_mode_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        binary = atomic_write(tmp_path / "b.npz", lambda fh: fh.write(b"x"))
        os.umask(0o002)
        shared = atomic_write_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(binary).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o664
    (tmp_path / "plain").write_text("")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
