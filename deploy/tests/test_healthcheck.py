"""The image's HEALTHCHECK script (deploy/docker/healthcheck.sh), against a
real HTTP server on loopback: 200 passes, anything else fails, and so does
a closed port."""

import http.server
import os
import socket
import subprocess
import threading

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "deploy", "docker", "healthcheck.sh")


class Handler(http.server.BaseHTTPRequestHandler):
    routes = {"/health": 200, "/ready": 503}

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        status = self.routes.get(self.path, 404)
        body = b'{"status":"ok"}' if status == 200 else b'{"status":"down"}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # The script hangs up after the status line; the body's write may
        # then meet a closed socket.
        pass


@pytest.fixture(scope="module")
def ops_addr():
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def check(addr, path=None):
    env = {"PATH": os.environ["PATH"], "CASEBOOK_OPS_ADDR": addr}
    if path:
        env["HEALTHCHECK_PATH"] = path
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, timeout=10).returncode


def test_200_is_healthy(ops_addr):
    assert check(ops_addr) == 0


def test_the_listen_address_0_0_0_0_is_probed_on_loopback(ops_addr):
    port = ops_addr.rsplit(":", 1)[1]
    assert check(f"0.0.0.0:{port}") == 0


def test_anything_but_200_is_unhealthy(ops_addr):
    assert check(ops_addr, "/ready") != 0
    assert check(ops_addr, "/nothing") != 0


def test_a_closed_port_is_unhealthy():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert check(f"127.0.0.1:{port}") != 0
