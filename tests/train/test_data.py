"""Corpus (TFDS array_record), split by play, BPE tokenizer and packed batches."""

import glob
import itertools
import os

import numpy as np
import pytest

from kvjax.lm.tokenizer import Tokenizer
from kvjax.train import corpus, data
from kvjax.train.corpus import CorpusError
from kvjax.train.tokenizer import corpus_tokenizer, save_tokenizer, train_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The Shakespeare corpus built once into a temporary data_dir."""
  return corpus.builder("shakespeare", data_dir=str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def docs(built):
  return {s: corpus.load_documents(built, s) for s in corpus.SPLITS}


@pytest.fixture(scope="module")
def tok(docs):
  return train_tokenizer([d.text for d in docs["train"]], VOCAB)


def _write(root, files):
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write(text)
  return str(root)


# --- corpus and split ---------------------------------------------------------------------------


def test_split_is_by_play_disjoint_complete_and_deterministic(built, docs):
  plays = glob.glob(os.path.join(corpus.shakespeare_dir(), "*", "*.md"))
  assert len(plays) == 38
  paths = {s: {d.path for d in docs[s]} for s in corpus.SPLITS}
  assert sum(len(p) for p in paths.values()) == 38
  assert set.union(*paths.values()) == {os.path.relpath(p, corpus.shakespeare_dir()) for p in plays}
  assert not (
    paths["train"] & paths["validation"]
    or paths["train"] & paths["test"]
    or paths["validation"] & paths["test"]
  )
  genres = set(corpus.genre_names(built))
  assert genres == {"comedy", "history", "problem", "roman", "romance", "tragedy"}
  for s in ("validation", "test"):
    assert sorted(d.genre for d in docs[s]) == sorted(genres)  # one play per genre
  # The built dataset follows the documented rule, recomputed from scratch.
  rule = corpus.assign_splits(corpus.read_documents("shakespeare"))
  assert all(rule[p] == s for s in corpus.SPLITS for p in paths[s])
  assert corpus.assign_splits(list(reversed(corpus.read_documents("shakespeare")))) == rule
  hamlet = next(d for s in docs.values() for d in s if d.title == "Hamlet")
  assert hamlet.genre == "tragedy" and hamlet.text.startswith("# Hamlet\n")
  assert "  \n" not in hamlet.text and len(hamlet.text) > 100_000  # whole play, normalized


def test_genre_filter_and_unknown_genre(built, docs):
  comedies = corpus.load_documents(built, "train", genres=["comedy"])
  others = corpus.load_documents(built, "train", exclude_genres=["comedy"])
  assert comedies and all(d.genre == "comedy" for d in comedies)
  assert others and all(d.genre != "comedy" for d in others)
  assert len(comedies) + len(others) == len(docs["train"])
  assert (
    corpus.load_documents(built, "train", genres=["comedy", "history"], exclude_genres=["history"])
    == comedies
  )
  with pytest.raises(CorpusError, match=r"unknown genre 'farce'.*comedy"):
    corpus.load_documents(built, "train", genres=["farce"])
  with pytest.raises(CorpusError, match="unknown genre 'Comedy'"):
    corpus.load_documents(built, "train", exclude_genres=["Comedy"])
  with pytest.raises(CorpusError, match="not the string"):
    corpus.load_documents(built, "train", genres="comedy")
  with pytest.raises(CorpusError, match="unknown split 'dev'"):
    corpus.load_documents(built, "dev")


def test_directory_corpus(tmp_path):
  root = _write(
    tmp_path / "mine",
    {
      "loose.txt": "Loose text.\r\nSecond line.   \r\n\r\n",
      "empty.txt": " \n\n",
      "notes.csv": "ignored",
      ".hidden/x.txt": "ignored",
      **{f"Poems/p{i}.md": f"# Poem {i}\n\nverse {i}  \nline" for i in range(4)},
      "letters/deep/l.txt": "Dear friend,\nfarewell.",
    },
  )
  b = corpus.builder(root, data_dir=str(tmp_path / "tfds"))
  assert corpus.genre_names(b) == ["letters", "poems", "unknown"]
  got = {d.path: d for s in corpus.SPLITS for d in corpus.load_documents(b, s)}
  assert sorted(got) == sorted(
    ["loose.txt", "letters/deep/l.txt"] + [f"Poems/p{i}.md" for i in range(4)]
  )
  assert got["loose.txt"] == corpus.Document(
    "Loose", "unknown", "Loose text.\nSecond line.", "loose.txt"
  )
  assert (
    got["Poems/p2.md"].title == "Poem 2" and got["Poems/p2.md"].text == "# Poem 2\n\nverse 2\nline"
  )
  assert got["letters/deep/l.txt"].genre == "letters"
  held = [d.genre for s in ("validation", "test") for d in corpus.load_documents(b, s)]
  assert held == ["poems", "poems"]  # genres of < 3 documents stay in train
  with pytest.raises(CorpusError, match=r"unknown genre 'comedy'.*letters, poems, unknown"):
    corpus.load_documents(b, "train", genres=["comedy"])


def test_missing_and_empty_corpus_errors(tmp_path):
  with pytest.raises(CorpusError, match="does not exist"):
    corpus.builder(tmp_path / "nope", data_dir=str(tmp_path / "tfds"))
  (tmp_path / "a_file.txt").write_text("text")
  with pytest.raises(CorpusError, match="not a directory"):
    corpus.builder(tmp_path / "a_file.txt", data_dir=str(tmp_path / "tfds"))
  no_text = _write(tmp_path / "no_text", {"data.csv": "a,b", "README": "x"})
  with pytest.raises(CorpusError, match=r"no .txt or .md files"):
    corpus.builder(no_text, data_dir=str(tmp_path / "tfds"))
  blank = _write(tmp_path / "blank", {"a.txt": "", "b.md": "  \n \n"})
  with pytest.raises(CorpusError, match=r"all 2 .txt/.md files are empty"):
    corpus.builder(blank, data_dir=str(tmp_path / "tfds"))
  assert not os.path.exists(tmp_path / "tfds" / "kvjax_corpus")  # nothing half-written


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_load(tmp_path, tok, docs):
  assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id) == (0, 1)
  play = docs["validation"][0].text
  samples = [play, "Ünïcödé — 日本語 😀\n\ttabs  and  spaces ", ""]
  for text in samples:
    ids = tok.encode(text)
    assert ids[0] == 0 and tok.decode(ids) == text
  assert len(tok.encode(play)) < 0.8 * len(play.encode())  # merges were learnt
  save_tokenizer(tok, tmp_path / "tk")
  loaded = Tokenizer.load(str(tmp_path / "tk"))
  assert (loaded.bos, loaded.eos, loaded.bos_id, loaded.eos_id) == ("<s>", "</s>", 0, 1)
  assert loaded.encode(play) == tok.encode(play) and loaded.decode(tok.encode(play)) == play
  with pytest.raises(ValueError, match="at least 258"):
    train_tokenizer(["abc"], 100)
  with pytest.raises(ValueError, match=r"no .*texts"):
    train_tokenizer(["", ""], 300)


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path):
  words = [chr(97 + i) * 2 + chr(110 + i) * 2 for i in range(10)]  # aann, bboo, ...
  root = _write(tmp_path / "c", {f"d{i}.txt": " ".join([w] * 40) for i, w in enumerate(words)})
  data_dir = str(tmp_path / "tfds")
  b = corpus.builder(root, data_dir=data_dir)
  split_of = {d.path: s for s in corpus.SPLITS for d in corpus.load_documents(b, s)}
  assert sorted(split_of.values()).count("train") == 8
  t = corpus_tokenizer(root, 400, data_dir=data_dir, show_progress=False)
  for i, w in enumerate(words):
    single = len(t.encode(" " + w, add_special_tokens=False)) == 1
    assert single == (split_of[f"d{i}.txt"] == "train"), (w, split_of[f"d{i}.txt"])


# --- packing ------------------------------------------------------------------------------------


def _rows(stream, seq_len):
  return [data.row(stream, r, seq_len) for r in range(stream.n_rows(seq_len))]


def _documents_from_targets(targets, mask, tok):
  """Texts rebuilt from the real targets in order: documents end at a masked-out target."""
  texts, cur = [], []
  for t, m in zip(targets, mask):
    if m == 0:  # the </s> -> <s> crossing
      texts.append(cur)
      cur = []
    elif t != tok.eos_id:
      cur.append(t)
  return [tok.decode(ids) for ids in texts + [cur]]


# The documents the packing tests pack: ASCII, non-ASCII, one character, many lines.
TEXTS = [
  "To be, or not to be: that is the question.",
  "é日本 — x",
  "a",
  "Line one\nline two\n" * 9,
]


def test_packing_mask_shift_chars_and_reconstruction(tok):
  stream = data.tokenize(TEXTS, tok)
  T = 16
  rows = _rows(stream, T)
  n_targets = len(stream.tokens) - 1
  assert len(rows) == -(-n_targets // T) and len(rows) * T > n_targets
  real = np.concatenate([r["segment_ids"] > 0 for r in rows])
  assert real.sum() == n_targets and real[:n_targets].all()
  for r, nxt in itertools.pairwise(rows):
    assert np.array_equal(r["inputs"][1:], r["targets"][:-1])  # shifted by one
    assert r["targets"][-1] == nxt["inputs"][0]  # windows overlap by one token
  inputs = np.concatenate([r["inputs"] for r in rows])[:n_targets]
  targets = np.concatenate([r["targets"] for r in rows])[:n_targets]
  mask = np.concatenate([r["mask"] for r in rows])
  chars = np.concatenate([r["chars"] for r in rows])
  assert np.array_equal(inputs, stream.tokens[:-1]) and np.array_equal(targets, stream.tokens[1:])
  # mask is 0 exactly at the 3 document crossings (</s> -> <s>) and on padding
  crossing = (inputs == tok.eos_id) & (targets == tok.bos_id)
  assert crossing.sum() == len(TEXTS) - 1
  assert np.array_equal(mask[:n_targets] == 0, crossing) and not mask[n_targets:].any()
  assert (mask[:n_targets][targets == tok.eos_id] == 1).all()  # </s> prediction counts
  assert not chars[n_targets:].any() and not chars[:n_targets][targets <= 1].any()
  assert (chars * mask).sum() == sum(len(t) for t in TEXTS)
  assert _documents_from_targets(targets, mask[:n_targets], tok) == TEXTS
  # segments and positions restart at each document inside a row
  r = next(r for r in rows if (r["mask"] == 0).any() and r["segment_ids"][-1] > 0)
  k = int(np.argmax(r["inputs"] == tok.bos_id))
  assert r["segment_ids"][k] == r["segment_ids"][k - 1] + 1 and r["positions"][k] == 0
  assert np.array_equal(np.diff(r["positions"][:k]), np.ones(k - 1))


def test_bos_rows_start_with_bos_and_count_every_target_once(tok):
  """bos=True: every row's first input is <s> (position 0, in the segment of the token after
  it), its target masked; the other targets are the stream's, each counted exactly once with
  the same mask and chars as plain packing, so loss and bits per character mean the same."""
  stream = data.tokenize(TEXTS, tok)
  T = 16
  rows = [data.row(stream, r, T, tok.bos_id) for r in range(stream.n_rows(T, bos=True))]
  plain = _rows(stream, T)
  assert len(rows) == -(-(len(stream.tokens) - 1) // (T - 1))
  for r in rows:
    real = r["segment_ids"] > 0
    assert r["inputs"][0] == tok.bos_id and r["positions"][0] == 0 and r["mask"][0] == 0
    assert r["segment_ids"][0] == r["segment_ids"][1] == 1 or not real[1]
    if real[1] and r["inputs"][1] != tok.bos_id:  # a row starting mid-document
      assert r["positions"][1] == 1

  # the counted targets, in order, are plain packing's counted targets
  def counted(rs, key):
    return np.concatenate([r[key][r["mask"] > 0] for r in rs])

  for key in ("targets", "chars"):
    assert np.array_equal(counted(rows, key), counted(plain, key))
  assert sum(r["mask"].sum() for r in rows) == sum(r["mask"].sum() for r in plain)
  with pytest.raises(ValueError, match="seq_len >= 2"):
    data.batches("unused", "train", tok, batch_size=1, seq_len=1, bos=True)


def test_chars_count_each_character_once():
  offsets = np.array([[0, 1], [1, 2], [1, 2], [2, 5], [5, 6]])  # two byte pieces of char 1
  assert data.token_chars(offsets, 6).tolist() == [1, 1, 0, 3, 1]
  with pytest.raises(CorpusError, match="cover 6 of 7"):
    data.token_chars(offsets, 7)


def test_eval_batches_cover_every_token_once(built, tok, docs):
  val = docs["validation"]
  B, T = 8, 128
  ds = data.eval_batches(built, "validation", tok, batch_size=B, seq_len=T)
  got = list(ds)
  assert len(got) == len(ds) and all(b["inputs"].shape == (B, T) for b in got)
  assert got[0]["inputs"].dtype == np.int32 and got[0]["mask"].dtype == np.float32
  flat = {k: np.concatenate([b[k] for b in got]).reshape(-1) for k in got[0]}
  real = flat["segment_ids"] > 0
  n = int(real.sum())
  assert real[:n].all()
  assert _documents_from_targets(flat["targets"][:n], flat["mask"][:n], tok) == [
    d.text for d in val
  ]
  assert (flat["chars"] * flat["mask"]).sum() == sum(len(d.text) for d in val)


def test_train_batches_shuffled_deterministic_and_filtered(built, tok):
  kw = dict(batch_size=4, seq_len=64, genres=["comedy"])
  a = data.batches(built, "validation", tok, seed=0, **kw)
  b = data.batches(built, "validation", tok, seed=0, **kw)
  c = data.batches(built, "validation", tok, seed=1, **kw)
  for i in (0, 3, 50):
    assert all(np.array_equal(a[i][k], b[i][k]) for k in a[i])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  assert np.array_equal(
    data.batches(built, "validation", tok, seed=0, start=3, **kw)[0]["inputs"], a[3]["inputs"]
  )
  # one shuffled epoch holds the same rows as the in-order pass
  epoch = data.batches(built, "validation", tok, seed=0, repeat=False, **kw)
  ordered = data.eval_batches(built, "validation", tok, **kw)
  rows = lambda ds: sorted(map(bytes, np.concatenate([x["inputs"] for x in ds])))
  assert len(epoch) == len(ordered) and rows(epoch) == rows(ordered)
  assert not np.array_equal(epoch[0]["inputs"], ordered[0]["inputs"])
  # the comedy filter: the stream is exactly the held-out comedy
  comedy = corpus.load_documents(built, "validation", genres=["comedy"])
  assert len(comedy) == 1
  assert tok.decode(np.concatenate([x["inputs"] for x in ordered]).reshape(-1)).startswith(
    comedy[0].text[:200]
  )
  with pytest.raises(CorpusError, match="unknown genre 'farce'"):
    data.batches(built, "train", tok, batch_size=2, seq_len=8, genres=["farce"])
  with pytest.raises(ValueError, match="seq_len must be a positive int"):
    data.batches(built, "validation", tok, batch_size=2, seq_len=0)
  with pytest.raises(CorpusError, match="has no documents"):
    data.batches(built, "validation", tok, batch_size=2, seq_len=8, genres=[])
