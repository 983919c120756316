"""The suite cleans up after itself (pytest.ini): it writes several GB per session, and with pytest's default every
test's files stayed for the last three sessions, which once filled the disk a CI run shared with them. A passing
test's tmp_path is removed when the test passes; the two tests run in file order."""
from pathlib import Path

written: list[Path] = []


def test_a_passing_test_writes_into_its_tmp_path(tmp_path):
    (tmp_path / "checkpoint.bin").write_bytes(bytes(1024))
    written.append(tmp_path)


def test_its_files_are_gone_once_it_passed():
    assert len(written) == 1, "run the whole file: the first test records its tmp_path"
    assert not written[0].exists(), f"{written[0]} outlived its passing test"
