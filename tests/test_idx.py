import numpy as np
import pytest

from ssl_pipeline.datasets.idx import IdxFormatError, encode_idx, parse_idx, read_idx


def test_round_trip_keeps_shape_and_values():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = parse_idx(encode_idx(images))
    assert parsed.dtype == np.uint8
    assert parsed.shape == (2, 3, 4)
    np.testing.assert_array_equal(parsed, images)


def test_header_is_big_endian_with_the_standard_magic():
    data = encode_idx(np.zeros((70000, 28, 28), dtype=np.uint8))
    assert data[:4] == bytes([0, 0, 0x08, 3])  # 0x00000803: unsigned bytes, 3 dimensions
    assert int.from_bytes(data[4:8], "big") == 70000


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
        (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "element type 0x0d"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "truncated header"),
        (b"\x00\x00\x08\x01" + (0).to_bytes(4, "big"), "empty dimension"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "truncated: shape (5,) needs 13 bytes"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "trailing bytes"),
    ],
)
def test_malformed_files_name_the_source_and_the_problem(data, problem):
    with pytest.raises(IdxFormatError) as error:
        parse_idx(data, source="some/file-idx")
    assert "some/file-idx" in str(error.value)
    assert problem in str(error.value)


def test_truncated_file_on_disk_is_reported_with_its_path(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(encode_idx(np.ones((10, 4, 4), dtype=np.uint8))[:-7])
    with pytest.raises(IdxFormatError, match=f"{path}: truncated"):
        read_idx(path)
