"""Bad input to every `kvjax` subcommand ends in ONE line on stderr that names the flag, file,
port or model and what was expected, a non-zero exit and no traceback: OS errors (a directory
where a file is expected, an output path that cannot be written, a port that is taken or has no
listener), text that is not UTF-8 (on argv, stdin, --text, --prompt-file, --prompts, --config),
a chat template that fails, integers that overflow (--seed, counts), a damaged checkpoint. Bad
flags exit 2, bad input found once the work runs exits 1. The library's sampling entry points
refuse a `key=` that is not a PRNG key with a TypeError that says what a key is."""

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import cli

from kvjax import coprocessor, lm, speculative
from kvjax.lm import engine, sot, tiny
from kvjax.lm.cli import build_parser, errors
from kvjax.lm.droidspeak import wire
from kvjax.lm.streaming import Session
from kvjax.speculative import head as heads
from kvjax.train.lm import TrainConfig
from kvjax.train.loop import optimizer

BAD = b"ab\xff\xfecd"  # not UTF-8 from byte 2 on
ESC = "ab\udcffcd"  # the text Python makes of such bytes on argv (and on stdin under C.UTF-8)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """The files the table refers to by {name}: a tiny model, a copy whose chat template does
  not parse, a non-UTF-8 file, a directory, a text file, training runs whose latest checkpoint
  is an empty step dir (run1) or has an empty manifest (run3, after step 2), and a port that a
  listener holds."""
  root = tmp_path_factory.mktemp("cli-errors")
  model = root / "model"
  lm.save(tiny.model(), str(model))
  template = root / "template"
  shutil.copytree(model, template)
  conf = json.loads((template / "tokenizer_config.json").read_text())
  conf["chat_template"] = "{% for m in messages %}{{ m['content'] "
  (template / "tokenizer_config.json").write_text(json.dumps(conf))
  (root / "bad.txt").write_bytes(BAD)
  (root / "dir").mkdir()
  (root / "file.txt").write_text("to be or not to be, that is the question. " * 40)
  (root / "run1" / "checkpoints" / "1").mkdir(parents=True)
  (root / "run3" / "checkpoints" / "2" / "default").mkdir(parents=True)
  (root / "run3" / "checkpoints" / "2" / "default" / "manifest.ocdbt").write_bytes(b"x" * 64)
  (root / "run3" / "checkpoints" / "3" / "default").mkdir(parents=True)
  (root / "run3" / "checkpoints" / "3" / "default" / "manifest.ocdbt").write_bytes(b"")
  with socket.create_server(("127.0.0.1", 0)) as busy:
    yield {
      "model": str(model),
      "template": str(template),
      "bad": str(root / "bad.txt"),
      "dir": str(root / "dir"),
      "file": str(root / "file.txt"),
      "root": str(root),
      "run1": str(root / "run1"),
      "run3": str(root / "run3"),
      "busy": str(busy.getsockname()[1]),
    }


M, T = "{model}", "{file}"
DROIDSPEAK_RUN = ["droidspeak", "run", "--sender", M, "--receiver", M, "--plan", "full"]
TRAIN = (
  "--d-model",
  "16",
  "--n-heads",
  "2",
  "--seq-len",
  "8",
  "--batch-size",
  "2",
  "--steps",
  "2",
  "--warmup",
  "0",
  "--no-progress",
)
# (id, argv, stdin, exit code, words the one line must hold); {name} is a path of `paths`
CASES = [
  (
    "generate-argv-not-utf8",
    ["generate", "--model", M, "--prompt", ESC],
    None,
    2,
    ["argument --prompt", "not UTF-8", "0xff"],
  ),
  (
    "generate-stdin-not-utf8",
    ["generate", "--model", M, "--prompt", "-"],
    ESC,
    1,
    ["--prompt - (stdin)", "not UTF-8", "0xff"],
  ),
  (
    "generate-stop-not-utf8",
    ["generate", "--model", M, "--prompt", "x", "--stop", ESC],
    None,
    2,
    ["argument --stop", "not UTF-8"],
  ),
  (
    "generate-seed-2**32",
    ["generate", "--model", M, "--prompt", "x", "--seed", str(2**32)],
    None,
    2,
    ["argument --seed", "[0, 2**32)"],
  ),
  (
    "generate-seed-negative",
    ["generate", "--model", M, "--prompt", "x", "--seed", "-1"],
    None,
    2,
    ["argument --seed", "[0, 2**32)"],
  ),
  (
    "generate-max-new-tokens-2**63",
    ["generate", "--model", M, "--prompt", "x", "--max-new-tokens", str(2**63)],
    None,
    2,
    ["argument --max-new-tokens", "at most 2147483647"],
  ),
  (
    "generate-chat-template",
    ["generate", "--model", "{template}", "--prompt", "x", "--chat"],
    None,
    1,
    ["the chat template of {template}", "(line 1)"],
  ),
  (
    "generate-model-is-a-file",
    ["generate", "--model", T, "--prompt", "x"],
    None,
    1,
    ["{file}", "not a model directory"],
  ),
  (
    "stream-argv-not-utf8",
    ["stream", "--model", M, "--prompt", ESC],
    None,
    2,
    ["argument --prompt", "not UTF-8"],
  ),
  (
    "stream-chat-stdin-not-utf8",
    ["stream", "--model", M],
    ESC + "\n",
    1,
    ["stdin line 1", "not UTF-8", "0xff"],
  ),
  (
    "stream-chat-template",
    ["stream", "--model", "{template}", "--prompt", "x", "--chat"],
    None,
    1,
    ["the chat template of {template}"],
  ),
  (
    "stream-seed-2**40",
    ["stream", "--model", M, "--seed", str(2**40)],
    None,
    2,
    ["argument --seed", "[0, 2**32)"],
  ),
  (
    "ppl-text-is-a-directory",
    ["ppl", "--model", M, "--text", "{dir}", "--window", "8"],
    None,
    2,
    ["--text {dir}", "is a directory"],
  ),
  (
    "ppl-text-not-utf8",
    ["ppl", "--model", M, "--text", "{bad}", "--window", "8"],
    None,
    1,
    ["--text {bad}", "not UTF-8", "0xff at byte 2"],
  ),
  (
    "ppl-stdin-not-utf8",
    ["ppl", "--model", M, "--text", "-", "--window", "8"],
    ESC,
    1,
    ["--text - (stdin)", "not UTF-8"],
  ),
  (
    "sinks-png-is-a-directory",
    ["sinks", "--model", M, "--text", T, "--png", "{dir}"],
    None,
    2,
    ["--png {dir}", "is a directory"],
  ),
  (
    "sinks-png-under-a-file",
    ["sinks", "--model", M, "--text", T, "--png", "{file}/a.png"],
    None,
    2,
    ["--png {file}/a.png", "{file} is not a directory"],
  ),
  (
    "sinks-text-not-utf8",
    ["sinks", "--model", M, "--text", "{bad}"],
    None,
    1,
    ["--text {bad}", "not UTF-8"],
  ),
  (
    "sot-question-not-utf8",
    ["sot", "--model", M, "--question", ESC],
    None,
    2,
    ["argument --question", "not UTF-8"],
  ),
  (
    "sot-skeleton-not-utf8",
    ["sot", "--model", M, "--question", "q", "--skeleton", ESC],
    None,
    2,
    ["argument --skeleton", "not UTF-8"],
  ),
  (
    "sot-stdin-not-utf8",
    ["sot", "--model", M, "--question", "-"],
    ESC,
    1,
    ["--question - (stdin)", "not UTF-8"],
  ),
  (
    "sot-prompts-not-utf8",
    ["sot", "--model", M, "--question", "q", "--prompts", "{bad}"],
    None,
    2,
    ["--prompts {bad}", "not UTF-8"],
  ),
  (
    "sot-prompts-is-a-directory",
    ["sot", "--model", M, "--question", "q", "--prompts", "{dir}"],
    None,
    2,
    ["--prompts {dir}", "is a directory"],
  ),
  (
    "droidspeak-run-prompt-file-not-utf8",
    [*DROIDSPEAK_RUN, "--prompt-file", "{bad}"],
    None,
    2,
    ["--prompt-file {bad}", "not UTF-8"],
  ),
  (
    "droidspeak-run-prompt-file-is-a-directory",
    [*DROIDSPEAK_RUN, "--prompt-file", "{dir}"],
    None,
    2,
    ["--prompt-file {dir}", "is a directory"],
  ),
  (
    "droidspeak-run-prompt-not-utf8",
    [*DROIDSPEAK_RUN, "--prompt", ESC],
    None,
    2,
    ["argument --prompt", "not UTF-8"],
  ),
  (
    "droidspeak-send-port-65536",
    ["droidspeak", "send", "--sender", M, "--plan", "full", "--prompt", "hi", "--port", "65536"],
    None,
    2,
    ["argument --port", "[0, 65535]"],
  ),
  (
    "droidspeak-send-out-is-a-directory",
    ["droidspeak", "send", "--sender", M, "--plan", "full", "--prompt", "hi", "--out", "{dir}"],
    None,
    2,
    ["--out {dir}", "is a directory"],
  ),
  (
    "droidspeak-receive-port-in-use",
    ["droidspeak", "receive", "--receiver", M, "--prompt", "hello", "--port", "{busy}"],
    None,
    1,
    ["127.0.0.1:{busy}", "already in use"],
  ),
  (
    "droidspeak-receive-in-is-a-directory",
    ["droidspeak", "receive", "--receiver", M, "--prompt", "hello", "--in", "{dir}"],
    None,
    2,
    ["--in {dir}", "is a directory"],
  ),
  (
    "droidspeak-profile-text-not-utf8",
    ["droidspeak", "profile", "--sender", M, "--receiver", M, "--text", "{bad}"],
    None,
    1,
    ["--text {bad}", "not UTF-8"],
  ),
  (
    "droidspeak-profile-out-under-a-file",
    ["droidspeak", "profile", "--sender", M, "--receiver", M, "--out", "{file}/p.json"],
    None,
    2,
    ["--out {file}/p.json", "is not a directory"],
  ),
  (
    "bench-batches-2**32",
    ["bench", "--model", M, "--batches", f"1,{2**32}"],
    None,
    2,
    ["argument --batches", "at most 2147483647"],
  ),
  (
    "bench-new-tokens-2**40",
    ["bench", "--model", M, "--new-tokens", str(2**40)],
    None,
    2,
    ["argument --new-tokens", "at most"],
  ),
  (
    "train-lm-out-is-a-file",
    ["train", "lm", "--text", T, "--tokenizer", M, "--out", T, *TRAIN],
    None,
    2,
    ["--out {file}", "not a directory"],
  ),
  (
    "train-lm-seed-2**32",
    ["train", "lm", "--text", T, "--tokenizer", M, "--out", "{root}/new", "--seed", str(2**32)],
    None,
    2,
    ["argument --seed", "[0, 2**32)"],
  ),
  (
    "train-lm-config-not-utf8",
    ["train", "lm", "--config", "{bad}"],
    None,
    2,
    ["--config {bad}", "not UTF-8", "0xff"],
  ),
  (
    "train-lm-config-is-a-directory",
    ["train", "lm", "--config", "{dir}"],
    None,
    2,
    ["--config {dir}", "directory"],
  ),
  (
    "train-lm-text-is-a-directory",
    ["train", "lm", "--text", "{dir}", "--tokenizer", M, "--out", "{root}/new", *TRAIN],
    None,
    2,
    ["--text {dir}", "is a directory"],
  ),
  (
    "train-lm-resume-empty-step-dir",
    ["train", "lm", "--text", T, "--tokenizer", M, "--out", "{run1}", *TRAIN],
    None,
    1,
    ["{run1}/checkpoints/1", "it is empty", "remove {run1}/checkpoints/1", "start afresh"],
  ),
  (
    "train-lm-resume-truncated-step",
    ["train", "lm", "--text", T, "--tokenizer", M, "--out", "{run3}", *TRAIN],
    None,
    1,
    ["{run3}/checkpoints/3", "empty file default/manifest.ocdbt", "resume from step 2"],
  ),
  (
    "train-eagle-out-under-a-file",
    ["train", "eagle", "--target", M, "--text", T, "--out", "{file}/run"],
    None,
    2,
    ["--out {file}/run", "is not a directory"],
  ),
  (
    "train-eagle-resume-empty-step-dir",
    ["train", "eagle", "--target", M, "--text", T, "--out", "{run1}"],
    None,
    1,
    ["{run1}/checkpoints/1", "it is empty"],
  ),
  (
    "train-coprocessor-seed-2**64",
    [
      "train",
      "coprocessor",
      "--base",
      M,
      "--latents",
      "2",
      "--text",
      T,
      "--out",
      "{root}/new",
      "--seed",
      str(2**64),
    ],
    None,
    2,
    ["argument --seed", "[0, 2**32)"],
  ),
  (
    "train-coprocessor-resume-truncated-step",
    ["train", "coprocessor", "--base", M, "--latents", "2", "--text", T, "--out", "{run3}"],
    None,
    1,
    ["{run3}/checkpoints/3", "empty file"],
  ),
  (
    "train-eval-seq-len-2**40",
    ["train", "eval", "--model", M, "--data", "{dir}", "--seq-len", str(2**40)],
    None,
    2,
    ["argument --seq-len", "at most"],
  ),
  (
    "train-export-run-is-a-file",
    ["train", "export", "--run", T, "--step", "1"],
    None,
    2,
    ["--run {file}", "not a directory"],
  ),
  (
    "train-export-out-is-a-file",
    ["train", "export", "--run", "{dir}", "--step", "1", "--out", T],
    None,
    2,
    ["--out {file}", "not a directory"],
  ),
  ("command-not-utf8", [ESC], None, 2, ["argument COMMAND", "invalid choice"]),
]


def one_line_error(code, out, err, want, words):
  """The run exited `want`, wrote nothing on stdout and exactly one line on stderr, an error
  line holding every word, no traceback."""
  assert code == want, err
  assert out == ""
  assert err.count("\n") == 1 and err.endswith("\n"), err
  assert err.startswith("kvjax") and ": error: " in err and "Traceback" not in err, err
  missing = [w for w in words if w not in err]
  assert not missing, f"{missing} not in {err!r}"


@pytest.mark.parametrize(
  "argv, stdin, want, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line(paths, argv, stdin, want, words):
  """Each subcommand on a bad input of each class: one error line naming what is wrong."""
  code, out, err = cli(*[a.format_map(paths) for a in argv], stdin=stdin)
  one_line_error(code, out, err, want, [w.format_map(paths) for w in words])


def test_help_lists_every_subcommand():
  """`kvjax --help` and `kvjax train --help` still work (exit 0, nothing on stderr)."""
  code, out, err = cli("--help")
  assert code == 0 and err == ""
  for command in ("generate", "stream", "ppl", "sot", "sinks", "droidspeak", "bench", "train"):
    assert command in out
  code, out, err = cli("train", "--help")
  assert code == 0 and err == "" and all(t in out for t in ("lm", "eagle", "coprocessor", "eval"))


@pytest.mark.parametrize(
  "argv, stdin, words",
  [
    (
      ["generate", "--model", "{model}", "--prompt", "-"],
      BAD,
      ["kvjax: error: --prompt - (stdin)", "invalid start byte 0xff at byte 2"],
    ),
    (
      ["sot", "--question", b"ab\xffcd"],
      b"",
      ["kvjax sot: error: argument --question", "undecodable byte 0xff at character 2"],
    ),
  ],
  ids=["stdin-bytes", "argv-bytes"],
)
def test_real_bytes_in_a_subprocess(paths, argv, stdin, words):
  """Bytes that are not UTF-8, as a shell hands them over: on stdin (read as bytes, decoded
  strictly) and on argv (which Python decodes with surrogate escapes)."""
  argv = [a if isinstance(a, bytes) else a.format_map(paths) for a in argv]
  proc = subprocess.run(
    [sys.executable, "-m", "kvjax", *argv],
    input=stdin,
    capture_output=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": "", "LC_ALL": "C.UTF-8"},
  )
  err = proc.stderr.decode("utf-8", "backslashreplace")
  one_line_error(
    proc.returncode,
    proc.stdout.decode(),
    err,
    1 if argv[0] == "generate" else 2,
    [w.format_map(paths) for w in words],
  )


@pytest.fixture(scope="module")
def export_run(paths, tmp_path_factory):
  """An LM run directory as `train export` reads it (run.json, spec/, the orbax checkpoint of
  step 4: the tiny model's params and their AdamW state), and a copy whose array files are cut
  to half their length."""
  run = tmp_path_factory.mktemp("export") / "run"
  tc = TrainConfig(steps=4, batch_size=2, seq_len=8, warmup=0, out_dir=str(run))
  model = lm.load(paths["model"])
  lm.save(model, str(run / "spec"), weights=False)
  (run / "run.json").write_text(json.dumps({"model": {}, "train": tc.resume_key()}))
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), model.params())
  state = {
    "params": params,
    "opt_state": optimizer(tc).init(params),
    "step": jnp.asarray(4, jnp.int32),
  }
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(str(run / "checkpoints"), options=options) as manager:
    manager.save(4, args=ocp.args.StandardSave(state), force=True)
  cut = run.parent / "cut"
  shutil.copytree(run, cut)
  data = cut / "checkpoints" / "4" / "default" / "ocdbt.process_0" / "d"
  for f in data.iterdir():
    os.truncate(f, f.stat().st_size // 2)
  return run, cut


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_export_of_a_truncated_checkpoint(export_run, tmp_path, caplog, monkeypatch):
  """`train export` of the intact run works; of the copy with truncated array files, it is one
  line naming the step's directory and saying to remove it (orbax's own error, caught). What
  orbax's abandoned reads of that directory leave for Python to print later (at exit), an
  unraisable error or asyncio's "exception was never retrieved" log, is dropped; an unrelated
  one is not. A coroutine the failed restore abandoned warns that it was never awaited (when
  the collector finds it, at a time that varies): dropped too, while a restore that works
  shows its warnings."""
  restore = ocp.CheckpointManager.restore

  def abandoning(self, *args, **kwargs):  # the warning at its worst time: inside the restore
    warnings.warn(
      "coroutine 'Store._get_array_metadatas' was never awaited", RuntimeWarning, stacklevel=1
    )
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", abandoning)
  run, cut = export_run
  code, out, err = cli("train", "export", "--run", run, "--step", 4, "--out", tmp_path / "ok")
  assert code == 0, err
  assert "warning: coroutine 'Store._get_array_metadatas' was never awaited" in err
  code, out, err = cli("train", "export", "--run", cut, "--step", 4, "--out", tmp_path / "no")
  step = cut / "checkpoints" / "4"
  one_line_error(
    code, out, err, 1, [f"{step}: the checkpoint of step 4 cannot be read", f"remove {step}"]
  )
  assert not os.path.exists(tmp_path / "no")
  # leftovers as orbax leaves them, made here so that they come at a known time
  sys.unraisablehook(
    types.SimpleNamespace(  # what an abandoned read's coroutine reports
      exc_type=ValueError,
      exc_value=ValueError(f'reading "{step}/default/" failed'),
      exc_traceback=None,
      err_msg="Exception ignored in",
      object=None,
    )
  )
  loop = asyncio.new_event_loop()
  for text in (f'Error reading in OCDBT database at local file "{step}/default/"', "other"):
    loop.create_future().set_exception(ValueError(text))  # dropped unretrieved: logged
  loop.close()
  gc.collect()
  logged = [r.exc_info[1] for r in caplog.records if r.name == "asyncio" and r.exc_info]
  assert [str(e) for e in logged] == ["other"]


def test_os_errors_name_the_flag(tmp_path, capsys):
  """An OSError that comes once the work runs names the flag whose path it is about (or whose
  directory holds it), the path and the system's reason; a closed stdout (`| head`) is a
  silent exit 141."""
  parser = build_parser()
  out, png = tmp_path / "run", tmp_path / "heat.png"
  args = parser.parse_args(["sinks", "--text", "-", "--png", str(png)])
  assert errors.describe(PermissionError(13, "Permission denied", str(png)), args, parser) == (
    f"--png {png}: Permission denied"
  )
  args = parser.parse_args(["droidspeak", "profile", "--out", str(out)])
  assert (
    errors.describe(IsADirectoryError(21, "Is a directory", str(out / "a" / "b")), args, parser)
    == f"--out {out}: {out / 'a' / 'b'}: Is a directory"
  )
  assert (
    errors.describe(
      ConnectionRefusedError(111, "cannot send to h:1: nothing is listening"), args, parser
    )
    == "cannot send to h:1: nothing is listening"
  )
  p = argparse.ArgumentParser()
  p.set_defaults(check=lambda a: None, run=lambda a: (_ for _ in ()).throw(BrokenPipeError()))
  assert errors.run(p, [], lambda a: "kvjax") == 141
  assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def lib(paths):
  """A model, an EAGLE head and a coprocessor for it, and sampling that needs a key."""
  model = lm.load(paths["model"])
  return model, heads.init(model, "eagle1"), coprocessor.init(model, 2)


SAMPLE = lm.Sampling(temperature=1.0)
ENTRY = {
  "generate": lambda m, h, c, key: lm.generate(
    m, ["hi"], max_new_tokens=2, sampling=SAMPLE, key=key
  ),
  "generate_iter": lambda m, h, c, key: next(
    lm.generate_iter(m, "hi", max_new_tokens=2, sampling=SAMPLE, key=key)
  ),
  "Session": lambda m, h, c, key: Session(m, window=8, sampling=SAMPLE, key=key),
  "speculative": lambda m, h, c, key: speculative.generate(
    m, h, ["hi"], max_new_tokens=2, sampling=SAMPLE, key=key
  ),
  "coprocessor": lambda m, h, c, key: coprocessor.generate(
    m, c, ["hi"], max_new_tokens=2, sampling=SAMPLE, key=key
  ),
  "sot": lambda m, h, c, key: sot.run(
    m, "why?", skeleton="1. a\n2. b", point_tokens=2, sampling=SAMPLE, key=key
  ),
}
KEYS = [
  (3, "got int"),
  (np.arange(3), "got a numpy int64 array of shape (3,)"),
  (jnp.zeros(3, jnp.uint32), "got a jax uint32 array of shape (3,)"),
  (jax.random.split(jax.random.key(0)), "got an array of keys of shape (2,)"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY))
@pytest.mark.parametrize("key, got", KEYS, ids=["int", "numpy", "raw-uint32[3]", "split"])
def test_key_must_be_a_prng_key(lib, entry, key, got):
  """Every sampling entry point refuses what is not one PRNG key, saying what a key is."""
  with pytest.raises(TypeError) as info:
    ENTRY[entry](*lib, key)
  assert "key must be a JAX PRNG key, e.g. jax.random.key(0)" in str(info.value)
  assert got in str(info.value)


def test_keys_that_are_accepted(lib):
  """One typed key, a legacy uint32[2] key (jax or numpy) and, for greedy decoding, None."""
  model = lib[0]
  for key in (jax.random.key(1), jax.random.PRNGKey(1), np.zeros(2, np.uint32)):
    assert engine.check_request(model, 1, SAMPLE, key) is SAMPLE
  assert engine.check_request(model, 1, None, None).greedy


def test_wire_names_the_port():
  """The DroidSpeak socket: nothing listening, a taken port and a port out of range are
  errors that name the host and port."""
  port = free_port()
  with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}: nothing is listening"):
    wire.send(b"x", port)
  with socket.create_server(("127.0.0.1", 0)) as busy:
    taken = busy.getsockname()[1]
    with pytest.raises(OSError, match=f"127.0.0.1:{taken}: the port is already in use"):
      wire.serve_once(taken, timeout=1)
  with pytest.raises(ValueError, match=r"port must be an int in \[0, 65535\]; got 70000"):
    wire.send(b"x", 70000)
