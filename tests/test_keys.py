import pytest

from dyadfs.errors import KVSError
from dyadfs.keys import FileRecord, MountRecord, dyad_key

VECTORS = {
    "data0.txt": "17f.204.15b.data0.txt",
    "data1.txt": "157.2d4.330.data1.txt",
    "data9.txt": "199.ee.c4.data9.txt",
    "group0/a4md_chunk0.dat": "12d.d1.20d.group0/a4md_chunk0.dat",
    "group0/a4md_chunk1.dat": "4b.16e.30f.group0/a4md_chunk1.dat",
    "group0/a4md_chunk9.dat": "3d.300.37b.group0/a4md_chunk9.dat",
    "file0.npy": "141.f6.129.file0.npy",
    "1/data0.txt": "263.2ce.2e1.1/data0.txt",
}


@pytest.mark.parametrize("upath,key", VECTORS.items())
def test_dyad_key_vectors(upath: str, key: str) -> None:
    assert dyad_key(upath) == key


def test_dyad_key_depth_and_bins() -> None:
    assert dyad_key("data0.txt", depth=2, bins=256) == "7f.4.data0.txt"
    assert dyad_key("data0.txt", depth=0) == "data0.txt"


def test_dyad_key_long_path_is_not_padded() -> None:
    long = "d/" * 70 + "f"  # 141 bytes: used as is
    key = dyad_key(long)
    assert key.endswith("." + long) and key.count(".") >= 3


def test_file_record_round_trip() -> None:
    rec = FileRecord("complete", 5757, 7, 123, 0o644, "node-1", None)
    assert FileRecord.decode(rec.encode(), "k") == rec


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"schema": 99, "state": "complete"}',
                                 b'{"schema": 1, "state": "complete"}',
                                 b'{"schema": 1, "state": "odd", "size": 1, "version": 1, '
                                 b'"mtime_ns": 1, "mode": 1, "owner": "x"}'])
def test_malformed_records_are_clear_errors(raw: bytes) -> None:
    with pytest.raises(KVSError, match="at 'files/x'"):
        FileRecord.decode(raw, "files/x")


def test_mount_record_round_trip() -> None:
    rec = MountRecord("h", 1, "/d", "tcp", "10.0.0.1:5", 1.5, None)
    assert MountRecord.decode(rec.encode(), "k") == rec
