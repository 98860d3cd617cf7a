"""Network failures in words a user can act on, and a cheap probe of whether a server can be reached.

No project imports: the download stage, the up-front check (cxr.needs) and the model builder (ImageNet weights)
all use it without depending on each other.
"""
from __future__ import annotations

TIMEOUT = 5.0   # seconds a reachability probe waits for an answer


def _chain(err: BaseException):
    """err and every exception behind it: causes, contexts, urllib's `reason`, and exceptions passed as
    arguments (requests wraps urllib3's MaxRetryError that way)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args) if isinstance(x, BaseException)]


def _shorten(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters, cut at a word boundary (never inside a word)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."


def reason(err: BaseException) -> str:
    """Why a network request failed, as a short phrase a user can act on: no network (the name does not
    resolve), refused, timed out, TLS, the HTTP status the server answered with, or missing credentials;
    anything else as its type and first words."""
    import socket
    import ssl

    chain = list(_chain(err))
    names = {type(e).__name__ for e in chain}
    status = next((s for e in chain for s in (getattr(getattr(e, "response", None), "status_code", None),
                                               getattr(e, "code", None)) if isinstance(s, int) and 100 <= s < 600), None)
    if status in (401, 403):
        return f"access refused (HTTP {status}): credentials missing or wrong"
    if status == 404:
        return "not found there (HTTP 404)"
    if status is not None:
        return f"the server answered HTTP {status}"
    if names & {"CredentialError", "UnauthenticatedError"}:
        return "credentials missing or wrong"
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in names:
        return "no network (the server's name does not resolve)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused (by a proxy or a firewall, or the server is down)"
    if any(isinstance(e, (TimeoutError, socket.timeout)) for e in chain) or names & {"Timeout", "ConnectTimeout", "ReadTimeout",
                                                                                    "ConnectTimeoutError", "ReadTimeoutError"}:
        return "no answer in time (a slow or filtered network)"
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSLError" in names:
        return "the secure connection failed (TLS: a proxy that intercepts it, or a wrong system clock)"
    if any(isinstance(e, OSError) and e.errno is not None for e in chain):
        e = next(e for e in chain if isinstance(e, OSError) and e.errno is not None)
        return f"network error ({e.strerror or e})"
    return _shorten(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def reachable(url: str, timeout: float = TIMEOUT) -> str | None:
    """None when `url` answers a HEAD request (any HTTP status: the server is there), else why not
    (reason()). Honours the usual proxy variables, as the downloads themselves do."""
    import urllib.error
    import urllib.request

    try:  # a new opener each time: it reads the proxy variables as they are now
        urllib.request.build_opener().open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:   # URLError is an OSError
        return reason(err)
    return None
