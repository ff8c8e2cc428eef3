"""A DroidSpeak payload over TCP: one uint64 length (little-endian) and the payload's bytes, to
one listener, loopback by default. Socket failures are OSErrors whose message names the host
and port and what went wrong (nothing listening, the port taken, an unknown host, a timeout)."""

from __future__ import annotations

import errno
import numbers
import socket
import struct

from kvjax.lm.droidspeak.payload import PayloadError


def send(payload: bytes, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
  """Sends one payload to a `serve_once` listener."""
  check_port(port)
  try:
    with socket.create_connection((host, port), timeout=timeout) as s:
      s.sendall(struct.pack("<Q", len(payload)) + payload)
  except OSError as err:
    raise _named(err, host, port, "send to") from None


def serve_once(port: int, host: str = "127.0.0.1", timeout: float = 60.0, on_listen=None) -> bytes:
  """Listens on host:port (port 0: any free one), accepts one connection and returns the
  payload it sends. on_listen(port) is called once listening (for port 0)."""
  check_port(port)
  try:
    srv = socket.create_server((host, port))
  except OSError as err:
    raise _named(err, host, port, "listen on") from None
  with srv:
    srv.settimeout(timeout)
    port = srv.getsockname()[1]  # the port listened on (port 0 picks one)
    if on_listen is not None:
      on_listen(port)
    try:
      conn, _ = srv.accept()
    except TimeoutError:
      raise PayloadError(f"no sender connected to {host}:{port} within {timeout:g} s") from None
    with conn:
      conn.settimeout(timeout)
      try:
        head = _recv(conn, 8)
        (n,) = struct.unpack("<Q", head)
        return _recv(conn, n)
      except TimeoutError:
        raise PayloadError(
          f"the sender on {host}:{port} went quiet for {timeout:g} s (truncated payload)"
        ) from None


def check_port(port) -> None:
  """ValueError unless port is an int in [0, 65535]."""
  if isinstance(port, bool) or not isinstance(port, numbers.Integral) or not 0 <= port <= 65535:
    raise ValueError(f"port must be an int in [0, 65535]; got {port!r}")


def _named(err: OSError, host: str, port: int, doing: str) -> OSError:
  """err as the same OSError class with a message naming host:port and the likely cause."""
  where = f"{host}:{port}"
  why = {
    errno.ECONNREFUSED: "nothing is listening there (start the receiver first)",
    errno.EADDRINUSE: "the port is already in use (pick another, or 0 for any free one)",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
  }.get(err.errno)
  if isinstance(err, socket.gaierror):
    why = f"unknown host ({err.strerror})"
  elif isinstance(err, TimeoutError):
    why = "timed out"
  why = why or err.strerror or str(err)
  cls = OSError if isinstance(err, socket.gaierror) else type(err)
  return cls(err.errno or 0, f"cannot {doing} {where}: {why}")


def _recv(conn, n: int) -> bytes:
  chunks, got = [], 0
  while got < n:
    chunk = conn.recv(min(n - got, 1 << 20))
    if not chunk:
      raise PayloadError(
        f"the sender closed the connection after {got} of {n} bytes (truncated payload)"
      )
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)
