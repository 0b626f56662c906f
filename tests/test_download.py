"""Downloads against a real HTTP server on loopback and local directory mirrors."""
import gzip
import hashlib

import pytest

from ssl_pipeline.stages.download import DownloadError, RetryPolicy, download_dataset, download_file

FAST = RetryPolicy(attempts=3, backoff_seconds=0.01, timeout_seconds=5)
CONTENT = b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"hello"
SHA = hashlib.sha256(CONTENT).hexdigest()


def no_leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_gzip_from_http_is_verified_on_decompressed_content(http_server, tmp_path):
    url, routes = http_server
    routes.table["/data.gz"] = ("ok", gzip.compress(CONTENT))
    download_file("data", SHA, [url], tmp_path / "data", FAST, {})
    assert (tmp_path / "data").read_bytes() == CONTENT
    assert no_leftovers(tmp_path) == ["data"]


def test_uncompressed_file_is_taken_when_no_gz_exists(http_server, tmp_path):
    url, routes = http_server
    routes.table["/data"] = ("ok", CONTENT)
    download_file("data", SHA, [url + "/"], tmp_path / "data", FAST, {})
    assert (tmp_path / "data").read_bytes() == CONTENT
    assert routes.requests == ["/data.gz", "/data"]


def test_checksum_mismatch_names_file_mirror_and_both_digests(http_server, tmp_path):
    url, routes = http_server
    wrong = CONTENT[:-1] + b"!"
    routes.table["/data.gz"] = ("ok", gzip.compress(wrong))
    with pytest.raises(DownloadError) as error:
        download_file("data", SHA, [url], tmp_path / "data", FAST, {})
    message = str(error.value)
    assert "checksum mismatch for data" in message
    assert url in message
    assert f"expected sha256 {SHA}" in message
    assert f"got {hashlib.sha256(wrong).hexdigest()}" in message
    assert no_leftovers(tmp_path) == []


def test_404_falls_back_to_the_next_mirror(http_server, tmp_path):
    url, routes = http_server
    routes.table["/second/data.gz"] = ("ok", gzip.compress(CONTENT))
    download_file("data", SHA, [url + "/first", url + "/second"], tmp_path / "data", FAST, {})
    assert (tmp_path / "data").read_bytes() == CONTENT
    assert routes.requests == ["/first/data.gz", "/first/data", "/second/data.gz"]


def test_truncated_transfer_is_retried_then_falls_back(http_server, tmp_path):
    url, routes = http_server
    body = gzip.compress(CONTENT)
    routes.table["/bad/data.gz"] = ("truncate", body, len(body) // 2)
    routes.table["/good/data.gz"] = ("ok", body)
    download_file("data", SHA, [url + "/bad", url + "/good"], tmp_path / "data", FAST, {})
    assert routes.count("/bad/data.gz") == FAST.attempts
    assert (tmp_path / "data").read_bytes() == CONTENT
    assert no_leftovers(tmp_path) == ["data"]


def test_server_errors_are_retried_with_backoff(http_server, tmp_path):
    url, routes = http_server
    routes.table["/data.gz"] = ("flaky", 2, gzip.compress(CONTENT))
    download_file("data", SHA, [url], tmp_path / "data", FAST, {})
    assert routes.count("/data.gz") == 3
    assert (tmp_path / "data").read_bytes() == CONTENT


def test_when_every_mirror_fails_the_error_lists_each_one(http_server, tmp_path):
    url, routes = http_server
    body = gzip.compress(CONTENT)
    routes.table["/short/data.gz"] = ("truncate", body, 10)
    routes.table["/corrupt/data"] = ("ok", b"not the data")
    missing_dir = tmp_path / "no-such-dir"
    mirrors = [url + "/absent", url + "/short", url + "/corrupt", str(missing_dir)]
    with pytest.raises(DownloadError) as error:
        download_file("data", SHA, mirrors, tmp_path / "out" / "data", FAST, {})
    lines = str(error.value).splitlines()
    assert lines[0] == "could not fetch data from any of 4 mirrors:"
    assert "/absent: not found (HTTP 404" in lines[1]
    assert "/short: truncated transfer" in lines[2] and "gave up after 3 attempts" in lines[2]
    assert "/corrupt: checksum mismatch" in lines[3]
    assert f"{missing_dir}: not found" in lines[4]
    assert not (tmp_path / "out").exists() or no_leftovers(tmp_path / "out") == []


def test_local_directory_and_file_url_mirrors(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "data.gz").write_bytes(gzip.compress(CONTENT))
    download_file("data", SHA, [str(mirror)], tmp_path / "a", FAST, {})
    download_file("data", SHA, [f"file://{mirror}"], tmp_path / "b", FAST, {})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == CONTENT


def test_unreachable_mirror_is_skipped_for_the_remaining_files(tmp_path, synthetic_mirror):
    directory, files = synthetic_mirror
    dead = "http://127.0.0.1:9"  # the discard port: connection refused
    destinations = {role: tmp_path / "raw" / spec["name"] for role, spec in files.items()}
    unreachable = {}
    for role, spec in files.items():
        download_file(spec["name"], spec["sha256"], [dead, str(directory)], destinations[role], FAST,
                      unreachable)
    assert list(unreachable) == [dead]
    assert all(path.exists() for path in destinations.values())


def test_a_dataset_with_one_file_missing_leaves_no_file_behind(tmp_path, synthetic_mirror):
    directory, files = synthetic_mirror
    (directory / f"{files['test_labels']['name']}.gz").unlink()
    destinations = {role: tmp_path / "raw" / spec["name"] for role, spec in files.items()}
    with pytest.raises(DownloadError, match=files["test_labels"]["name"]):
        download_dataset(files, [str(directory)], destinations, FAST)
    assert no_leftovers(tmp_path / "raw") == []
