"""The four built-in jobs: noop, fib, eval and wait (design section 1)."""

from __future__ import annotations

import http.client
import ssl
import string
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

from shared import catalog, expr
from workernator_runner.jobs import Job, JobFailed, Network

REQUEST_TIMEOUT_SECONDS = 30.0


def say(tag: str, text: str) -> None:
    print(f"[{tag}] {text}", flush=True)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- noop -------------------------------------------------------------------------------------


def run_noop(args: Mapping[str, Any]) -> None:
    """Does nothing."""


# --- fib --------------------------------------------------------------------------------------

_LOOKUP = (0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181)


def fibonacci(n: int) -> int:
    """F(n) with F(0) = 0, F(1) = 1, exactly, by fast doubling: O(log n) multiplications."""
    a, b = 0, 1  # F(k), F(k+1) for k = the bits of n read so far
    for bit in bin(n)[2:]:
        c = a * (2 * b - a)  # F(2k)
        d = a * a + b * b  # F(2k+1)
        a, b = (d, c + d) if bit == "1" else (c, d)
    return a


def run_fib(args: Mapping[str, Any]) -> None:
    position: int = args["position"]
    say("FIB", f"Calculating the value of the {ordinal(position)} value in the Fibonacci sequence")
    index = position - 1  # 1-indexed from 0: position 1 is F(0)
    if index < len(_LOOKUP):
        value = _LOOKUP[index]
        say("FIB", f"Using lookup; value is '{value}'.")
        say("RESULT", str(value))
        return
    value = fibonacci(index)
    # Python refuses to print ints of more than 4300 digits by default (CVE-2020-10735): the
    # limit protects parsers, and this number is ours, bounded by MAX_FIB_POSITION.
    sys.set_int_max_str_digits(0)
    text = str(value)
    say("FIB", f"Using fast doubling; value has {len(text)} digits.")
    say("RESULT", text)


# --- eval -------------------------------------------------------------------------------------


def run_eval(args: Mapping[str, Any]) -> None:
    parsed = expr.parse(args["expression"])
    variables: Mapping[str, float] = args.get("variables", {})
    say("EVAL", f"Parsed expression: {parsed}")
    used = sorted(parsed.variables())
    if used:
        values = ", ".join(f"{name} = {expr.format_number(variables[name])}" for name in used)
        say("EVAL", f"Variables: {values}")
    try:
        result = parsed.evaluate(variables)
    except expr.EvaluationError as exc:
        raise JobFailed(f"Cannot evaluate: {exc}") from None
    say("RESULT", expr.format_number(result))


# --- wait -------------------------------------------------------------------------------------


MAX_REDIRECTS = 5


def _seconds(value: float) -> str:
    text = f"{value:g}"
    return f"{text} second" if value == 1 else f"{text} seconds"


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most :data:`MAX_REDIRECTS` redirects, and only to http(s) URLs, no user info.

    urllib's own handler would also follow a redirect to ftp:// (and log in there), and answer a
    redirect to other schemes with an HTTPError the job would report as a status. Here a
    redirect anywhere else ends the job FAILED, before any connection is made.
    """

    def __init__(self) -> None:
        self.followed = 0  # one opener, so one handler, per job

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
    ) -> Any:
        location = headers.get("location", headers.get("uri"))
        if location is None:
            return None  # nowhere to go: the 3xx itself is the answer, reported as a status
        target = _redirect_target(req.full_url, location)
        refusal = _redirect_refusal(target)
        if refusal is None and self.followed >= MAX_REDIRECTS:
            refusal = f"{MAX_REDIRECTS} redirects were followed already, the most allowed"
        if refusal is not None:
            fp.close()
            raise JobFailed(f"Redirect to {_without_password(target)} refused: {refusal}")
        new = self.redirect_request(req, fp, code, msg, headers, target)
        if new is None:
            return None
        self.followed += 1
        say("WAIT", f"Following a {code} redirect to {target}")
        fp.close()  # the redirect's body is not needed (urllib reads it all first)
        return self.parent.open(new, timeout=req.timeout)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if code in (307, 308):
            # These keep the method and the body: the empty POST stays an empty POST (urllib
            # itself follows a 307 or 308 only for a GET or a HEAD).
            return urllib.request.Request(  # noqa: S310 - checked by _redirect_refusal
                newurl,
                data=req.data,
                headers=dict(req.headers),
                origin_req_host=req.origin_req_host,
                unverifiable=True,
                method=req.get_method(),
            )
        # 301, 302 and 303: urllib turns the POST into a GET without a body, as browsers do.
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _redirect_target(base: str, location: str) -> str:
    """The absolute URL a Location header points to, as urllib computes it."""
    # http.client decodes headers as ISO-8859-1: recover the bytes and percent-encode those
    # that are not ASCII, and spaces and control characters.
    quoted = urllib.parse.quote(location, encoding="iso-8859-1", safe=string.punctuation)
    try:
        return urllib.parse.urljoin(base, quoted)
    except ValueError:  # e.g. "http://[::1/": refused by _redirect_refusal
        return quoted


def _redirect_refusal(target: str) -> str | None:
    """Why the job does not follow a redirect to ``target``, or None if it does."""
    try:
        parts = urllib.parse.urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "only http and https redirects are followed"
    if "@" in parts.netloc:
        return "a redirect URL must not contain a user name or password"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _without_password(url: str) -> str:
    """``url`` for an output line: a password in it is replaced by ``***``."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return url
    # The scheme cannot hold "@" and the user name cannot hold ":", so this is the password.
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


def _opener() -> urllib.request.OpenerDirector:
    """An opener for http and https only.

    Unlike ``urlopen``'s it has no ProxyHandler (so proxy environment variables are never
    used), no ftp:, file: or data: handlers, and redirects go through :class:`_Redirects`.
    """
    opener = urllib.request.OpenerDirector()
    handlers: tuple[urllib.request.BaseHandler, ...] = (
        urllib.request.UnknownHandler(),  # any other scheme: URLError "unknown url type"
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        urllib.request.HTTPErrorProcessor(),  # a non-2xx answer goes to the error handlers:
        _Redirects(),  # a redirect is followed or refused,
        urllib.request.HTTPDefaultErrorHandler(),  # anything else raises HTTPError
    )
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def run_wait(args: Mapping[str, Any]) -> None:
    seconds: float = args["seconds"]
    url: str = args["url"]
    say("WAIT", f"Waiting {_seconds(seconds)} before sending a POST to {url}")
    time.sleep(seconds)
    say("WAIT", f"Sending a POST to {url}")
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - http(s) only
    try:
        with _opener().open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            status, reason = response.status, response.reason
    except urllib.error.HTTPError as exc:  # an answer, just not a 2xx one
        status, reason = exc.code, exc.reason
        exc.close()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JobFailed(f"Request to {url} failed: {reason}") from None
    say("WAIT", f"Response status: {status} {reason}".rstrip())
    say("RESULT", str(status))


JOBS = (
    Job(catalog.NOOP, run_noop, framed=False),  # noop prints nothing at all
    Job(catalog.FIB, run_fib),
    Job(catalog.EVAL, run_eval),
    Job(catalog.WAIT, run_wait, network=Network.EGRESS),  # the only job that needs a network
)
