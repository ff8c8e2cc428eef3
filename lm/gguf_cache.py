"""Converted copies of GGUF files, so that only the first load of a file pays for dequantizing it.

A GGUF file's tensors are quantized (Q4_K, Q8_0, ...): reading one dequantizes every tensor in
numpy and builds its tokenizer from the metadata, seconds for a 135M model and over ten for
Gemma 3's 262k-token vocabulary. `lm.load` keeps what it read as a Hugging Face directory (the
float32 params, which hold every dequantized value exactly, config.json, tokenizer.json) in

    <root>/gguf/<sha256 of the file>-v<CONVERTER>/

and loads that directory on the next load of the same bytes, in whatever dtype is asked. The
root is `$KVJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/kvjax`, else `~/.cache/kvjax`. A file's
digest is remembered by (path, size, modification time) in `<root>/gguf/digests.json`, so a
second load hashes nothing. A copy is written to a temporary directory and renamed into place
complete (`DONE` is its last file), so an interrupted conversion or two processes converting
at once never leave a half copy that a later load would read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from kvjax.lm import user_warnings

CONVERTER = 1  # bump when the conversion changes what a copy holds: older copies are not read
DONE = "kvjax-gguf-copy.json"  # written last into a complete copy: its source and digest
DIGESTS = "digests.json"
ENV = "KVJAX_CACHE_DIR"


class CacheWarning(UserWarning):
  """The converted-copy cache could not be read or written; the GGUF file was read itself."""


def default_root() -> str:
  """$KVJAX_CACHE_DIR, else $XDG_CACHE_HOME/kvjax, else ~/.cache/kvjax."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kvjax")


def root_of(cache: bool | str | os.PathLike) -> str | None:
  """The cache root that `lm.load(..., cache=cache)` uses: None (no cache) for False, the
  default root for True, else the directory given."""
  if cache is True:
    return default_root()
  if cache is False or cache is None:
    return None
  return os.fspath(cache)


def digest(path: str, root: str) -> str:
  """The sha256 hex digest of the file at `path`, remembered under `root` by its real path,
  size and modification time (a changed file is hashed again)."""
  real = os.path.realpath(path)
  st = os.stat(real)
  stamp = [st.st_size, st.st_mtime_ns]
  book_path = os.path.join(root, "gguf", DIGESTS)
  book = _read_book(book_path)
  known = book.get(real)
  if isinstance(known, list) and len(known) == 3 and known[:2] == stamp:
    return str(known[2])
  h = hashlib.sha256()
  with open(real, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  book[real] = [*stamp, h.hexdigest()]
  _write_atomic(book_path, json.dumps(book, indent=1))
  return h.hexdigest()


def copy_dir(root: str, sha256: str) -> str:
  """Where the converted copy of the file with this digest lives (it may not exist yet)."""
  return os.path.join(root, "gguf", f"{sha256}-v{CONVERTER}")


def complete(copy: str) -> bool:
  """Whether `copy` is a converted copy that was written to the end."""
  return os.path.isfile(os.path.join(copy, DONE))


def write(copy: str, save, *, source: str, sha256: str) -> None:
  """Writes a converted copy into `copy`: save(directory) writes the Hugging Face directory,
  then DONE records its source. Written beside `copy` and renamed into place; a copy that
  another process completed first is kept. An unwritable root is a CacheWarning, not an
  error: the model was read already."""
  parent = os.path.dirname(copy)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
  except OSError as err:
    _warn(f"cannot write a converted copy of {source} under {parent} ({err})")
    return
  try:
    save(tmp)
    with open(os.path.join(tmp, DONE), "w") as f:
      json.dump({"source": os.path.realpath(source), "sha256": sha256, "converter": CONVERTER}, f)
    if complete(copy):  # another process finished first
      return
    shutil.rmtree(copy, ignore_errors=True)  # an incomplete copy left by an old kvjax
    os.replace(tmp, copy)
  except OSError as err:
    _warn(f"cannot write a converted copy of {source} to {copy} ({err})")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def discard(copy: str, reason: str) -> None:
  """Removes a converted copy that failed to load (a CacheWarning says why)."""
  _warn(f"{copy}: the converted copy is unreadable ({reason}); converting the file again")
  shutil.rmtree(copy, ignore_errors=True)


def _warn(message: str) -> None:
  user_warnings.warn(message, CacheWarning)


def _read_book(path: str) -> dict:
  try:
    with open(path) as f:
      book = json.load(f)
  except (OSError, ValueError):  # none yet, or damaged: it is only a memo
    return {}
  return book if isinstance(book, dict) else {}


def _write_atomic(path: str, text: str) -> None:
  """Writes text to path through a temporary file and a rename; a memo that cannot be written
  is skipped (the next load hashes the file again)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError:
    pass
