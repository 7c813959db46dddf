"""The TLS examples as users run them: ``examples/httpd.py --tls-cert/--tls-key`` under
``curl --cacert``, ``examples/echo.py --tls`` under ``openssl s_client``, on both
backends, with certificates trustme makes for the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from test_examples import EXAMPLES, ROOT, free_port, running


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CA's certificate, and a server certificate and key for localhost/127.0.0.1."""
    directory = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "cert.pem",
        "key": directory / "key.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    for index, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(files["cert"]), append=index > 0)
    cert.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_httpd_serves_https_to_curl(backend: str, pems: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "index.html").write_bytes(b"<p>over TLS</p>\n")
    big = bytes(range(256)) * 8192  # 2 MiB: streamed in chunks, many records
    (tmp_path / "big.bin").write_bytes(big)
    number = free_port()
    command = (
        sys.executable,
        str(EXAMPLES / "httpd.py"),
        "--port",
        str(number),
        "--root",
        str(tmp_path),
        "--tls-cert",
        pems["cert"],
        "--tls-key",
        pems["key"],
        "--no-access-log",
        "--backend",
        backend,
    )
    with running(*command) as process:
        assert process.stdout is not None
        base = f"https://localhost:{number}"
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                pems["ca"],
                f"{base}/index.html",
                f"{base}/big.bin",
            ],
            capture_output=True,
            timeout=20,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"<p>over TLS</p>\n" + big
        # Without the CA, curl refuses the certificate, and the server goes on.
        refused = subprocess.run(
            ["curl", "-sS", f"{base}/index.html"], capture_output=True, timeout=20
        )
        assert refused.returncode == 60, refused.stderr  # "SSL certificate problem"
        # HTTP to the HTTPS port: a handshake failure, logged; the server goes on.
        plain = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{number}/index.html"],
            capture_output=True,
            timeout=20,
        )
        assert plain.returncode != 0
        again = subprocess.run(
            ["curl", "-sS", "--cacert", pems["ca"], "-w", "%{http_version}", f"{base}/index.html"],
            capture_output=True,
            timeout=20,
        )
        assert again.stdout == b"<p>over TLS</p>\n1.1", again.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_echo_serves_tls_to_openssl_s_client(backend: str, pems: dict[str, str]) -> None:
    number = free_port()
    command = (
        sys.executable,
        str(EXAMPLES / "echo.py"),
        "--port",
        str(number),
        "--tls",
        "--tls-cert",
        pems["cert"],
        "--tls-key",
        pems["key"],
        "--backend",
        backend,
    )
    with running(*command):
        client = subprocess.Popen(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{number}",
                "-CAfile",
                pems["ca"],
                "-verify_return_error",
                "-verify_hostname",
                "localhost",
                "-quiet",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"hello over tls\n")
            client.stdin.flush()
            assert client.stdout.readline() == b"hello over tls\n"
            client.stdin.write(b"x" * 50000 + b"\n")  # several records
            client.stdin.flush()
            assert client.stdout.readline() == b"x" * 50000 + b"\n"
        finally:
            client.kill()
            client.wait(10)
            for pipe in (client.stdin, client.stdout, client.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.mark.parametrize(
    ("script", "arguments", "error"),
    [
        ("echo.py", ["--tls"], "--tls needs --tls-cert and --tls-key"),
        ("echo.py", ["--tls-cert", "x.pem"], "--tls-cert and --tls-key need --tls"),
        ("httpd.py", ["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
        (
            "httpd.py",
            ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"],
            "No such file",
        ),
    ],
)
def test_wrong_tls_arguments_are_one_line_and_exit_2(
    script: str, arguments: list[str], error: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr
    assert error in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
