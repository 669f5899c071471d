"""The test servers of object_store.py behave like the real services they stand in for."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import fsspec
import pytest


def test_s3_server_is_reached_by_fsspec_defaults_and_boto3(s3_bucket):
    url = f"{s3_bucket.url}/dir/hello.bin"
    with fsspec.open(url, "wb") as handle:  # no options: the environment points at moto
        handle.write(b"hello s3")
    fs = s3_bucket.server.filesystem()
    assert fs.cat(url) == b"hello s3"
    assert fs.ls(f"{s3_bucket.url}/dir", detail=False) == [f"{s3_bucket.name}/dir/hello.bin"]
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_bucket.server.endpoint_url)
    body = client.get_object(Bucket=s3_bucket.name, Key="dir/hello.bin")["Body"].read()
    assert body == b"hello s3"
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{s3_bucket.url}/dir/missing.bin")


def test_gcs_emulator_is_reached_by_fsspec_defaults_and_a_subprocess(gcs_bucket):
    url = f"{gcs_bucket.url}/dir/hello.bin"
    with fsspec.open(url, "wb") as handle:  # no options: the environment points at the emulator
        handle.write(b"hello gcs")
    fs = gcs_bucket.server.filesystem()
    assert fs.cat(url) == b"hello gcs"
    assert fs.ls(f"{gcs_bucket.url}/dir", detail=False) == [f"{gcs_bucket.name}/dir/hello.bin"]
    info = fs.info(url)
    assert info["size"] == len(b"hello gcs") and info["etag"] and info["generation"]
    with fsspec.open(url, "rb") as handle:  # a ranged read
        handle.seek(6)
        assert handle.read() == b"gcs"
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{gcs_bucket.url}/dir/missing.bin")
    # a new process (as `embseg build` or a DataLoader's spawned worker) inherits the settings
    read = subprocess.run([sys.executable, "-c", f"import fsspec, sys; sys.stdout.buffer.write("
                           f"fsspec.open({url!r}, 'rb').open().read())"],
                          capture_output=True, timeout=60)
    assert read.returncode == 0 and read.stdout == b"hello gcs", read.stderr.decode()[-2000:]


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", dict(exc.headers)


def test_http_server_serves_ranges_errors_and_drops(served):
    data = bytes(range(256)) * 40
    (served.path / "a.bin").write_bytes(data)
    status, body, headers = _get(served.url_of("a.bin"))
    assert (status, body, headers["Content-Length"]) == (200, data, str(len(data)))
    status, body, headers = _get(served.url_of("a.bin"), {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert _get(served.url_of("missing.bin"))[0] == 404
    served.fail("a.bin", 503)
    assert _get(served.url_of("a.bin"))[0] == 503
    served.drop_after("a.bin", 1000)
    # curl (what webdataset reads http with) sees the short body and fails: exit 18
    result = subprocess.run(["curl", "-f", "-s", "-o", "/dev/null", served.url_of("a.bin")],
                            timeout=30)
    assert result.returncode == 18
    assert ("GET", None) in served.server.requested(served.path / "a.bin")
