import errno
import json
import re

import pytest

from dyadfs.errors import KVSError
from dyadfs.keys import DyadOwner, FileRecord, MountRecord, dyad_key, dyad_owner

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
    assert json.loads(rec.encode())["schema"] == 2 and rec.kind == "file"


@pytest.mark.parametrize("rec", [
    FileRecord("complete", 0, 1, 5, 0o755, "m", kind="dir"),
    FileRecord("complete", 3, 1, 5, 0o777, "m", kind="symlink", target="a/b"),
    FileRecord("complete", 6, 1, -5, 0o777, "m", kind="symlink",  # any bytes in a target
               target=b"\xff/x\n".decode("utf-8", "surrogateescape")),
])
def test_directory_and_symlink_records_round_trip(rec: FileRecord) -> None:
    assert FileRecord.decode(rec.encode(), "k") == rec


def test_schema_1_record_reads_as_a_file() -> None:
    raw = (b'{"schema":1,"state":"complete","size":5,"version":7,"mtime_ns":1,"mode":420,'
           b'"owner":"m","sha256":null}')
    rec = FileRecord.decode(raw, "files/x")
    assert rec == FileRecord("complete", 5, 7, 1, 0o644, "m") and rec.kind == "file"


MISSING = object()
GOOD = {"schema": 2, "kind": "file", "state": "complete", "size": 1, "version": 1,
        "mtime_ns": 1, "mode": 420, "owner": "m", "sha256": None, "target": None}


@pytest.mark.parametrize("change,message", [
    ({"size": -1}, "field 'size' is -1 (expected an integer >= 0)"),
    ({"size": "12"}, "field 'size' is '12' (expected an integer >= 0)"),
    ({"state": "odd"}, "field 'state' is 'odd'"),
    ({"version": MISSING}, "field 'version' is missing"),
    ({"version": 1.5}, "field 'version' is 1.5 (expected an integer)"),
    ({"mode": 0o170000}, "field 'mode' is 61440"),
    ({"owner": 3}, "field 'owner' is 3"),
    ({"kind": "fifo"}, "field 'kind' is 'fifo'"),
    ({"kind": "symlink"}, "field 'target' is None (expected the link's target)"),
    ({"kind": "dir", "state": "writing"}, "field 'state' is 'writing' for a dir"),
    ({"schema": 3}, "field 'schema' 3; this dyadfs reads schema 1 or 2"),
])
def test_malformed_record_names_the_field_and_value(change: dict[str, object],
                                                    message: str) -> None:
    data = {k: v for k, v in {**GOOD, **change}.items() if v is not MISSING}
    with pytest.raises(KVSError, match=re.escape(message)) as err:
        FileRecord.decode(json.dumps(data).encode(), "files/x")
    assert "'files/x'" in str(err.value) and err.value.errno == errno.EIO


@pytest.mark.parametrize("raw,message", [
    (b"not json", "not JSON: b'not json'"),
    (b"[1]", "not a JSON object: [1]"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_values_are_clear_errors(raw: bytes, message: str) -> None:
    with pytest.raises(KVSError, match=re.escape(message)):
        FileRecord.decode(raw, "files/x")


def test_mount_record_round_trip() -> None:
    rec = MountRecord("h", 1, "/d", "tcp", "10.0.0.1:5", 1.5, None)
    assert MountRecord.decode(rec.encode(), "k") == rec


def test_dyad_owner_is_a_broker_rank() -> None:
    """DYAD's key holds a JSON integer (flux_kvs_txn_pack "i"); dyadfs writes the same text."""
    assert dyad_owner(b"0", "k") == DyadOwner(0)
    assert dyad_owner(b"17", "k") == DyadOwner(17)
    for bad in (b"-1", b"1.5", b"true", b'"3"', b"", b"\xff", b"[0]"):
        with pytest.raises(KVSError, match="does not hold a broker rank"):
            dyad_owner(bad, "k")
