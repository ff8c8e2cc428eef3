"""A DroidSpeak payload over TCP: one uint64 length (little-endian) and the payload's bytes, to
one listener, loopback by default."""

from __future__ import annotations

import socket
import struct

from kvjax.cache.droidspeak.payload import PayloadError


def send(payload: bytes, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
  """Sends one payload to a `serve_once` listener."""
  with socket.create_connection((host, port), timeout=timeout) as s:
    s.sendall(struct.pack("<Q", len(payload)) + payload)


def serve_once(port: int, host: str = "127.0.0.1", timeout: float = 60.0,
               on_listen=None) -> bytes:
  """Listens on host:port (port 0: any free one), accepts one connection and returns the
  payload it sends. on_listen(port) is called once listening (for port 0)."""
  with socket.create_server((host, port)) as srv:
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
      head = _recv(conn, 8)
      (n,) = struct.unpack("<Q", head)
      return _recv(conn, n)


def _recv(conn, n: int) -> bytes:
  chunks, got = [], 0
  while got < n:
    chunk = conn.recv(min(n - got, 1 << 20))
    if not chunk:
      raise PayloadError(f"the sender closed the connection after {got} of {n} bytes "
                         "(truncated payload)")
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)
