"""The ``wait`` job's request, run in this process against local servers, and its URL checks.

The job must go only where the user said, over http or https: redirects are followed only to
http(s) URLs without user info, at most ``MAX_REDIRECTS`` of them, and proxy environment
variables are ignored. Listeners standing in for an FTP server and a proxy record whether
anything connected to them.
"""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from shared import catalog
from shared.errors import InvalidArgument
from workernator_runner.jobs import JobFailed, builtin

PROXY_VARIABLES = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    body: bytes


class Server:
    """An HTTP server on 127.0.0.1 in a thread: answers each path as told, records requests.

    ``routes`` maps a path to a status and headers; other paths get 404. A request is recorded
    before it is answered, so once the job has its answer the request is in ``seen``.
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str]]] = {}
        self.seen: list[Seen] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                server.seen.append(Seen(self.command, self.path, self.rfile.read(length)))
                status, headers = server.routes.get(self.path, (404, {}))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def redirect(self, path: str, location: str, code: int = 302) -> None:
        self.routes[path] = (code, {"Location": location})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


class Listener:
    """A TCP listener on 127.0.0.1 that records whether anything connected to it.

    It sends ``greeting`` to whoever connects (an FTP server speaks first), reads what comes,
    then hangs up, so a client that should never have come fails fast instead of waiting.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # how often the accept loop looks at _stop
        self.port: int = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.received = bytearray()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connected.set()
            with conn:
                conn.settimeout(5)
                try:
                    if self.greeting:
                        conn.sendall(self.greeting)
                    self.received += conn.recv(4096)
                except OSError:
                    pass

    def stop(self) -> bool:
        """Stop listening; True if anything connected, even if it was never accepted."""
        if not self._stop.is_set():
            self._stop.set()
            self.thread.join(timeout=10)
            assert not self.thread.is_alive()
            self.sock.setblocking(False)
            try:  # a connection still in the backlog connected too
                conn, _ = self.sock.accept()
            except BlockingIOError:
                pass
            else:
                conn.close()
                self.connected.set()
            self.sock.close()
        return self.connected.is_set()


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy settings from the machine running the tests, and short request timeouts."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    # A regression fails in seconds instead of waiting the job's 30 s for an answer.
    monkeypatch.setattr(builtin, "REQUEST_TIMEOUT_SECONDS", 5.0)
    # Like in a fresh job process, a urlopen() would build its opener, and read the proxy
    # environment, anew: it caches the opener of its first call.
    urllib.request.install_opener(None)
    yield
    urllib.request.install_opener(None)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def other_server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def ftp() -> Iterator[Listener]:
    listener = Listener(greeting=b"220 fake FTP server ready\r\n")
    yield listener
    listener.stop()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.stop()


def wait(url: str) -> None:
    builtin.run_wait(catalog.WAIT.validate({"seconds": 0, "url": url}))


def refused(url: str) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        wait(url)
    return info.value


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    out, err = capsys.readouterr()
    assert err == ""  # the job's error line is printed by the monitor, from JobFailed
    return out.splitlines()


# --- normal answers ---------------------------------------------------------------------------


def test_a_2xx_answer_is_reported(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes["/ok"] = (201, {})
    wait(f"{server.base}/ok")
    assert lines(capsys) == [
        f"[WAIT] Waiting 0 seconds before sending a POST to {server.base}/ok",
        f"[WAIT] Sending a POST to {server.base}/ok",
        "[WAIT] Response status: 201 Created",
        "[RESULT] 201",
    ]
    assert server.seen == [Seen("POST", "/ok", b"")]


def test_a_non_2xx_answer_is_reported_as_its_status(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    wait(f"{server.base}/missing")
    assert lines(capsys)[-2:] == ["[WAIT] Response status: 404 Not Found", "[RESULT] 404"]
    assert server.seen == [Seen("POST", "/missing", b"")]


def test_a_redirect_without_a_location_is_reported_as_its_status(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/nowhere"] = (302, {})
    wait(f"{server.base}/nowhere")
    assert lines(capsys)[-2:] == ["[WAIT] Response status: 302 Found", "[RESULT] 302"]


# --- redirects that are followed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "method"),
    # 301, 302 and 303 turn the POST into a GET (as urllib and browsers do); 307 and 308 keep it.
    [(301, "GET"), (302, "GET"), (303, "GET"), (307, "POST"), (308, "POST")],
)
def test_a_redirect_to_http_is_followed(
    server: Server,
    other_server: Server,
    capsys: pytest.CaptureFixture[str],
    code: int,
    method: str,
) -> None:
    server.redirect("/go", f"{other_server.base}/final", code)
    other_server.routes["/final"] = (200, {})
    wait(f"{server.base}/go")
    assert lines(capsys) == [
        f"[WAIT] Waiting 0 seconds before sending a POST to {server.base}/go",
        f"[WAIT] Sending a POST to {server.base}/go",
        f"[WAIT] Following a {code} redirect to {other_server.base}/final",
        "[WAIT] Response status: 200 OK",
        "[RESULT] 200",
    ]
    assert server.seen == [Seen("POST", "/go", b"")]
    assert other_server.seen == [Seen(method, "/final", b"")]


def test_a_relative_redirect_is_followed_and_a_final_error_reported(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.redirect("/go", "/gone")
    wait(f"{server.base}/go")
    assert lines(capsys)[-3:] == [
        f"[WAIT] Following a 302 redirect to {server.base}/gone",
        "[WAIT] Response status: 404 Not Found",
        "[RESULT] 404",
    ]
    assert server.seen == [Seen("POST", "/go", b""), Seen("GET", "/gone", b"")]


def test_a_redirect_to_https_is_followed(server: Server, listener: Listener) -> None:
    """The listener is no TLS server, so the request fails, but it was made: not refused."""
    target = f"https://127.0.0.1:{listener.port}/secure"
    server.redirect("/go", target)
    error = refused(f"{server.base}/go")
    assert str(error).startswith(f"Request to {server.base}/go failed: ")
    assert listener.stop()


def test_exactly_the_most_redirects_allowed_are_followed(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(builtin.MAX_REDIRECTS):
        server.redirect(f"/r{i}", f"/r{i + 1}")
    server.routes[f"/r{builtin.MAX_REDIRECTS}"] = (200, {})
    wait(f"{server.base}/r0")
    assert lines(capsys)[-2:] == ["[WAIT] Response status: 200 OK", "[RESULT] 200"]
    assert len(server.seen) == builtin.MAX_REDIRECTS + 1


# --- redirects that are refused ----------------------------------------------------------------


def test_a_redirect_to_ftp_is_refused_and_nothing_connects(
    server: Server, ftp: Listener, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"ftp://127.0.0.1:{ftp.port}/etc/passwd"
    server.redirect("/go", target)
    error = refused(f"{server.base}/go")
    assert str(error) == (
        f"Redirect to {target} refused: only http and https redirects are followed"
    )
    assert not ftp.stop()
    assert ftp.received == b""
    assert lines(capsys) == [
        f"[WAIT] Waiting 0 seconds before sending a POST to {server.base}/go",
        f"[WAIT] Sending a POST to {server.base}/go",
    ]
    assert server.seen == [Seen("POST", "/go", b"")]


def test_urllib_itself_would_follow_the_ftp_redirect(server: Server, ftp: Listener) -> None:
    """A check of the test above: its redirect does reach the FTP listener with plain urllib."""
    server.redirect("/go", f"ftp://127.0.0.1:{ftp.port}/etc/passwd")
    request = urllib.request.Request(f"{server.base}/go", data=b"", method="POST")
    with pytest.raises(OSError):  # URLError, or the listener hanging up
        urllib.request.build_opener().open(request, timeout=5)
    assert ftp.stop()


@pytest.mark.parametrize(
    "target",
    [
        "file:///etc/passwd",
        "data:text/plain,hello",
        "gopher://127.0.0.1/",
        "javascript:alert(1)",
        "mailto:root@localhost",
    ],
)
def test_a_redirect_to_another_scheme_is_refused(server: Server, target: str) -> None:
    server.redirect("/go", target)
    error = refused(f"{server.base}/go")
    assert str(error) == (
        f"Redirect to {target} refused: only http and https redirects are followed"
    )


@pytest.mark.parametrize(
    ("user_info", "shown"),
    [("u:p@", "u:***@"), ("u:s3cret@", "u:***@"), ("u@", "u@"), ("@", "@"), (":p@", ":***@")],
)
def test_a_redirect_to_a_url_with_user_info_is_refused(
    server: Server, other_server: Server, user_info: str, shown: str
) -> None:
    port = other_server.httpd.server_address[1]
    server.redirect("/go", f"http://{user_info}127.0.0.1:{port}/final")
    error = refused(f"{server.base}/go")
    assert str(error) == (
        f"Redirect to http://{shown}127.0.0.1:{port}/final refused: "
        "a redirect URL must not contain a user name or password"
    )
    assert other_server.seen == []


def test_more_redirects_than_allowed_fail_clearly(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.redirect("/loop", "/loop")
    error = refused(f"{server.base}/loop")
    assert str(error) == (
        f"Redirect to {server.base}/loop refused: "
        f"{builtin.MAX_REDIRECTS} redirects were followed already, the most allowed"
    )
    assert len(server.seen) == builtin.MAX_REDIRECTS + 1
    followed = [line for line in lines(capsys) if line.startswith("[WAIT] Following")]
    assert len(followed) == builtin.MAX_REDIRECTS


# --- proxies -----------------------------------------------------------------------------------


def point_proxies_at(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    for name in PROXY_VARIABLES[:-1]:
        monkeypatch.setenv(name, f"http://127.0.0.1:{listener.port}")
        monkeypatch.setenv(name.upper(), f"http://127.0.0.1:{listener.port}")


def test_proxy_environment_variables_are_ignored(
    server: Server,
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_proxies_at(monkeypatch, listener)
    server.routes["/ok"] = (201, {})
    wait(f"{server.base}/ok")
    assert lines(capsys)[-1] == "[RESULT] 201"
    assert server.seen == [Seen("POST", "/ok", b"")]
    assert not listener.stop()


def test_urllib_itself_would_use_the_proxy(
    server: Server, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check of the test above: its environment does send plain urllib to the listener."""
    point_proxies_at(monkeypatch, listener)
    request = urllib.request.Request(f"{server.base}/ok", data=b"", method="POST")
    with pytest.raises(OSError):  # a fresh opener: it reads the environment
        urllib.request.build_opener().open(request, timeout=5)
    assert listener.stop()
    assert listener.received.startswith(f"POST {server.base}/ok HTTP/1.1\r\n".encode())
    assert server.seen == []


# --- the url argument --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@host/",
        "http://user@host/",
        "https://user:s3cret@example.com:8443/a?b=c",
        "http://user:@host/",
        "http://:s3cret@host/",
        "http://@host/",
    ],
)
def test_a_url_with_user_info_is_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        catalog.WAIT.validate({"seconds": 1, "url": url})
    assert info.value.message == "argument 'url': must not contain a user name or password"
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://host/",
        "https://example.com:8443/a/b?x=1#frag",
        "http://127.0.0.1:8080/",
        "http://[::1]/",
        "http://host/path@with-at",
        "http://host/?to=someone@example.com",
        "http://host/#me@here",
    ],
)
def test_a_plain_url_is_accepted(url: str) -> None:
    assert catalog.WAIT.validate({"seconds": 1, "url": url}) == {"seconds": 1.0, "url": url}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/", "must be an http:// or https:// URL"),
        ("ftp://u:p@host/", "must be an http:// or https:// URL"),
        ("http://", "has no host"),
        ("http://host:0/", "port must be between 1 and 65535"),
        ("http://host:99999/", "is not a valid URL"),
        ("http://host/a b", "must not contain spaces or control characters"),
        (
            "http://host/" + "a" * catalog.MAX_URL_LENGTH,
            "is 2060 characters long; the most allowed is 2048",
        ),
        ("http://host/" + "a" * 10_000, "is 10012 characters long; the most allowed is 2048"),
    ],
)
def test_the_other_url_checks_still_hold(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^argument 'url': {message}"):
        catalog.WAIT.validate({"seconds": 1, "url": url})
