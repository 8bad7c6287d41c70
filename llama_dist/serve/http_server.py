"""Runs the HTTP app with uvicorn on a background thread of rank 0, leaving the main thread to the engine loop.

The main thread keeps SIGINT/SIGTERM (it decides how the ranks shut down), so uvicorn must not install its own
signal handlers; the socket is bound here, before the thread starts, so a busy port is a clear error at start-up
rather than a log line from a dying thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llama_dist.errors import ConfigError

__all__ = ["HttpServer", "open_file_limit"]

DEFAULT_REQUEST_TIMEOUT_S = 30.0
# A connection left open after a response is closed after this long without a new request.
KEEP_ALIVE_S = 5.0
# File descriptors kept for the rest of the process (checkpoint files, the ranks' sockets, logs) when the connection
# limit is derived from the open-file limit.
RESERVED_FILES = 256


class _ServerWithoutSignals(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to the caller (recent uvicorn skips it off the main thread
    anyway; this makes it so for every version: older ones call install_signal_handlers, newer capture_signals)."""

    def install_signal_handlers(self) -> None:
        pass

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _TimelyH11(H11Protocol):
    """uvicorn's HTTP/1.1 connection, with a clock on the request headers: they must be complete within
    `header_timeout_s` of the connection opening (or of the previous response), else the client gets 408 and the
    connection closes. uvicorn's own keep-alive timer starts only after a first response and stops at the first
    byte, so without this an idle or trickling client holds its connection (and a file descriptor) forever."""

    header_timeout_s = DEFAULT_REQUEST_TIMEOUT_S
    _header_clock: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_clock()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: its body has the app's own deadline
            self._stop_header_clock()

    def on_response_complete(self) -> None:
        self._start_header_clock()  # first: the next pipelined request may be read in there
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self._stop_header_clock()
        self._header_clock = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_clock is not None:
            self._header_clock.cancel()
            self._header_clock = None

    def _headers_too_slow(self) -> None:
        self._header_clock = None
        if not self.transport.is_closing():
            # h11 cannot answer a request it has not read: the status line is written as is.
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()


def _timely_protocol(header_timeout_s: float) -> type[H11Protocol]:
    return type("TimelyH11", (_TimelyH11,), {"header_timeout_s": header_timeout_s})


def open_file_limit() -> int:
    """The process's open-file limit, raised first to the hard limit it may reach (as servers do: every connection
    holds a file descriptor, and distributions ship a soft limit of 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class HttpServer:
    """An ASGI app served by uvicorn on a daemon thread: `start` returns once it listens, `stop` ends it.

    request_timeout_s: a client has this long to send a request's headers (408 and the connection closed after).
    max_connections: open connections beyond this get 503 for their requests rather than exhausting file
    descriptors (None: the open-file limit, raised to its maximum, less RESERVED_FILES)."""

    def __init__(self, log_level: str = "warning", graceful_timeout_s: float = 5.0,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, max_connections: int | None = None):
        if request_timeout_s <= 0 or (max_connections is not None and max_connections < 1):
            raise ConfigError("request_timeout_s must be above 0 and max_connections at least 1")
        self.log_level = log_level
        self.graceful_timeout_s = graceful_timeout_s  # how long open streams may run on once stop() is called
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections or max(64, open_file_limit() - RESERVED_FILES)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None
        self._address = ""

    @property
    def port(self) -> int:
        """The port listened on (the one chosen by the system when started with port 0)."""
        if self._socket is None:
            raise RuntimeError("the HTTP server is not started")
        return self._socket.getsockname()[1]

    def bind(self, host: str, port: int) -> None:
        """Take host:port now, without listening yet (connections are refused until `start`). ConfigError if it
        cannot be had (the port is busy, the host is not this machine's)."""
        if self._socket is not None:
            raise RuntimeError("the HTTP server is already bound")
        self._socket = _bind(host, port)
        self._address = f"{host}:{port}"

    def start(self, app, host: str | None = None, port: int | None = None, timeout_s: float = 30.0) -> None:
        """Serve `app` on the address `bind` took (or bind host:port now); returns once it accepts connections.
        ConfigError if the address cannot be listened on."""
        if self._thread is not None:
            raise RuntimeError("the HTTP server is already started")
        if self._socket is None:
            self.bind(host, port)
        host, port = self._address.rsplit(":", 1)
        _listen(self._socket, self._address)
        config = uvicorn.Config(app, log_level=self.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=self.graceful_timeout_s,
                                http=_timely_protocol(self.request_timeout_s), limit_concurrency=self.max_connections,
                                timeout_keep_alive=KEEP_ALIVE_S)
        self._server = _ServerWithoutSignals(config)
        self._thread = threading.Thread(target=self._serve, name="llama_dist-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = f": {self._failure!r}" if self._failure is not None else " in time"
                self.stop(timeout_s=1.0)
                raise ConfigError(f"the HTTP server on {host}:{port} did not start{why}")
            time.sleep(0.01)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as e:  # noqa: BLE001 - uvicorn exits start-up failures with SystemExit
            self._failure = e

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ask uvicorn to finish (open streams get `graceful_timeout_s`) and wait for its thread at most
        `timeout_s`; True if it ended."""
        if self._thread is None:
            if self._socket is not None:  # bound, never served (the model failed to load)
                self._socket.close()
            return True
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)
        stopped = not self._thread.is_alive()
        if stopped:
            self._socket.close()
            self._thread = None
        return stopped


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise _cannot_listen(f"{host}:{port}", e) from None
    # As uvicorn does: a restarted server may take the port over from connections still in TIME_WAIT (a port
    # another process listens on stays refused).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)  # a port another process listens on is refused here, before the model loads
    except OSError as e:
        sock.close()
        raise _cannot_listen(f"{host}:{port}", e) from None
    sock.set_inheritable(False)
    return sock


def _listen(sock: socket.socket, address: str) -> None:
    try:
        sock.listen(2048)  # here rather than in uvicorn, so a port taken since `bind` is refused now
    except OSError as e:
        raise _cannot_listen(address, e) from None


def _cannot_listen(address: str, e: OSError) -> ConfigError:
    hint = " (is another server using it?)" if e.errno == errno.EADDRINUSE else ""
    return ConfigError(f"cannot listen on {address}: {e.strerror or e}{hint}")
