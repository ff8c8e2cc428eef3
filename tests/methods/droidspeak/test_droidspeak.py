"""DroidSpeak cache reuse (kvjax.lm.droidspeak): plans, capture, the receiver's prefill.

The pair is a tiny 4-layer llama and a "fine-tune" of it: the same params plus noise, so the
two models agree in architecture but not in any layer's output.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from by_hand import assert_rows_close, droidspeak_kv
from helpers import cli

from kvjax import lm
from kvjax.lm import droidspeak as ds
from kvjax.lm import steps, tiny
from kvjax.lm.droidspeak import wire
from kvjax.lm.generate import new_cache

L = 4
PREFIXES = [[5, 9, 12, 40, 7, 7, 100, 3, 18, 22, 31], [44, 2, 90, 16, 8]]


@pytest.fixture(scope="module")
def pair():
  sender = tiny.model("llama", n_layers=L, seed=0)
  rng = np.random.default_rng(1)
  tuned = jax.tree.map(
    lambda a: a + 0.05 * np.std(a) * rng.standard_normal(a.shape).astype(np.float32),
    sender.params(),
  )
  return sender, sender.with_params(tuned)


def padded(rows, P=16):
  tokens = np.zeros((len(rows), P), np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r
  return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32)


def own_prefill(model, tokens, lengths, size=16):
  _, cache = steps.prefill(
    model.graphdef, model.state, new_cache(model, tokens.shape[0], size), tokens, lengths
  )
  return cache


def assert_cache_equal(a, b, lengths, atol=0.0):
  """Equal K/V in every filled slot, equal positions and lengths."""
  np.testing.assert_array_equal(a.length, b.length)
  np.testing.assert_array_equal(a.pos, b.pos)
  for b_, n in enumerate(np.asarray(lengths)):
    for name in ("k", "v"):
      x = np.asarray(getattr(a, name))[:, b_, :, :n]  # [L, K, n, H]
      y = np.asarray(getattr(b, name))[:, b_, :, :n]
      np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=f"{name} row {b_}")


def test_plan_values():
  p = ds.Plan.parse("1-3", L)
  assert p.groups == ((1, 3),) and p.recomputed == (1, 2) and p.reused == (0, 3)
  assert p.e_layers == (1,) and p.recomputed_fraction == 0.5 and str(p) == "1-3"
  assert ds.Plan.parse("full", L) == ds.Plan.full(L) and ds.Plan.full(L).e_layers == ()
  assert ds.Plan.parse("none", L) == ds.Plan.reuse_all(L) and str(ds.Plan.reuse_all(L)) == "none"
  assert ds.Plan.kv_from(2, L).groups == ((0, 2),) and ds.Plan.kv_from(0, L).groups == ()
  assert ds.Plan.parse(" 0-1, 2-4 ", L).groups == ((0, 1), (2, 4))
  assert hash(p) == hash(ds.Plan.parse("1-3", L))


@pytest.mark.parametrize(
  "text, message",
  [
    ("0-2,1-3", "overlap or are out of order"),
    ("2-4,0-1", "overlap or are out of order"),
    ("1-5", r"group \[1, 5\) is not a non-empty layer range within \[0, 4\)"),
    ("2-2", r"group \[2, 2\) is not a non-empty"),
    ("1:3", "'1:3' is not a group 'start-stop'"),
  ],
)
def test_bad_plans(text, message):
  with pytest.raises(ds.DroidSpeakError, match=message):
    ds.Plan.parse(text, L)


def test_full_recompute_equals_the_receivers_own_prefill(pair):
  sender, receiver = pair
  tokens, lengths = padded(PREFIXES)
  plan = ds.Plan.full(L)
  sent = ds.capture(sender, tokens, lengths, plan)
  assert sent.k.shape[0] == 0 and sent.e.shape[0] == 0  # nothing of the sender is needed
  got = ds.receive(receiver, sent, size=16)
  assert_cache_equal(got, own_prefill(receiver, tokens, lengths), lengths)


def test_reuse_all_equals_the_senders_cache(pair):
  sender, receiver = pair
  tokens, lengths = padded(PREFIXES)
  sent = ds.capture(sender, tokens, lengths, ds.Plan.reuse_all(L))
  assert sent.k.shape[0] == L and sent.e.shape[0] == 0
  got = ds.receive(receiver, sent, size=16)
  assert_cache_equal(got, own_prefill(sender, tokens, lengths), lengths)


@pytest.mark.parametrize("text", ["1-3", "0-1,2-4", "3-4", "1-2,3-4", "0-1,2-3,3-4"])
def test_mixed_plan_equals_a_layer_by_layer_computation(pair, text):
  """Reused layers: the sender's K/V; each group: the sender's hidden state entering its first
  layer, then the receiver's layers one at a time. Plans of several groups starting at
  different E layers ("1-2,3-4"; "2-3,3-4" after a layer-0 group: the group at 3 starts from
  the sender's E at 3, not from the group before it) read each group's own E."""
  sender, receiver = pair
  tokens, lengths = padded(PREFIXES)
  plan = ds.Plan.parse(text, L)
  sent = ds.capture(sender, tokens, lengths, plan)
  got = ds.receive(receiver, sent, size=24)
  assert got.size == 24
  assert_rows_close(got, *droidspeak_kv(sender, receiver, tokens, plan), lengths)
  np.testing.assert_array_equal(got.length, lengths)
  for j, i in enumerate(plan.reused):  # reused layers hold the sender's K/V bit for bit
    np.testing.assert_array_equal(np.asarray(got.k)[i, :, :, :16], np.asarray(sent.k)[j])
    np.testing.assert_array_equal(np.asarray(got.v)[i, :, :, :16], np.asarray(sent.v)[j])


def test_the_receiver_continues_from_the_spliced_cache(pair):
  """New tokens attend to the spliced cache: with a full-recompute plan the receiver's next
  logits are its own (lm.score); with a mixed plan they are the receiver's over that cache."""
  sender, receiver = pair
  prefix, suffix = PREFIXES[0], [61, 62, 63]
  tokens, lengths = padded([prefix])
  want = lm.score(receiver, prefix + suffix)[-1]

  def continued(plan: ds.Plan):  # the receiver fed the suffix over the plan's spliced cache
    cache = ds.receive(receiver, ds.capture(sender, tokens, lengths, plan), size=32)
    suffix_ids, n_new = jnp.asarray([suffix], jnp.int32), jnp.asarray([3], jnp.int32)
    return steps.extend(receiver.graphdef, receiver.state, cache, suffix_ids, n_new)

  logits, cache = continued(ds.Plan.full(L))
  np.testing.assert_allclose(logits[0], want, atol=1e-4)
  assert int(cache.length[0]) == len(prefix) + 3
  logits2, _ = continued(ds.Plan.parse("2-4", L))
  assert np.isfinite(np.asarray(logits2)).all()
  assert not np.allclose(logits2[0], want, atol=1e-4)  # layers 0-1 are the sender's


def test_mismatches_get_clear_errors(pair):
  sender, receiver = pair
  tokens, lengths = padded(PREFIXES)
  other = tiny.model("llama", n_layers=3)
  with pytest.raises(ds.DroidSpeakError, match=r"n_layers 4 \(receiver: 3\)"):
    ds.check_pair(sender, other)
  ds.check_pair(sender, receiver)
  with pytest.raises(ds.DroidSpeakError, match="plan is for 4 layers; the sender has 3"):
    ds.capture(other, tokens, lengths, ds.Plan.full(L))
  sent = ds.capture(sender, tokens, lengths, ds.Plan.parse("1-2", L))
  with pytest.raises(ds.DroidSpeakError, match="plan is for 4 layers; the receiver has 3"):
    ds.receive(other, sent)
  with pytest.raises(ds.DroidSpeakError, match="size 8 cannot hold the 16-token"):
    ds.receive(receiver, sent, size=8)
  with pytest.raises(ds.DroidSpeakError, match=r"lengths must lie in \[1, 16\]"):
    ds.capture(sender, tokens, jnp.asarray([0, 5], jnp.int32), ds.Plan.full(L))
  with pytest.raises(ds.DroidSpeakError, match="tokens must be an int array"):
    ds.capture(sender, np.zeros((2, 16), np.float32), lengths, ds.Plan.full(L))
  with pytest.raises(ds.DroidSpeakError, match=r"capture.e has shape"):
    import dataclasses

    ds.receive(receiver, dataclasses.replace(sent, e=sent.e[:, :1]))


# --- the transfer payload -----------------------------------------------------------------


def _sent(pair, text="1-3"):
  sender, _ = pair
  tokens, lengths = padded(PREFIXES)
  return ds.capture(sender, tokens, lengths, ds.Plan.parse(text, L))


def test_payload_round_trip_file_and_socket(pair, tmp_path):
  import threading

  from kvjax.lm.droidspeak import payload as pl

  sender, receiver = pair
  sent = _sent(pair)
  data = pl.encode(sent, sender)
  pl.write(str(tmp_path / "p.bin"), data)
  back = pl.decode(pl.read(str(tmp_path / "p.bin")), receiver, sender=sender, prefix=PREFIXES)
  assert back.plan == sent.plan
  for name in ("tokens", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(sent, name)))
  n = max(map(len, PREFIXES))  # slots past the longest prefix are padding, not sent
  for name in ("k", "v", "e"):
    a, b = np.asarray(getattr(back, name)), np.asarray(getattr(sent, name))
    assert a.shape == b.shape
    axis = pl.SLOT_AXIS[name]  # k, v [R, B, K, P, H]; e [G, B, P, D]
    np.testing.assert_array_equal(np.take(a, range(n), axis), np.take(b, range(n), axis))
    assert not np.take(a, range(n, a.shape[axis]), axis).any()
  assert_cache_equal(ds.receive(receiver, back), ds.receive(receiver, sent), sent.lengths)
  sizes = sum(getattr(sent, name).size for name in ("k", "v", "e"))
  assert pl.read_header(data)[0]["data_bytes"] == sizes // 16 * n * 4  # float32, n of 16 slots
  got = []
  ready = threading.Event()
  port = {}

  def listen():
    got.append(
      wire.serve_once(0, timeout=30, on_listen=lambda p: (port.setdefault("p", p), ready.set()))
    )

  t = threading.Thread(target=listen)
  t.start()
  assert ready.wait(30)
  wire.send(data, port["p"])
  t.join(30)
  assert got == [data]
  header, _ = pl.read_header(data)
  assert header["plan"] == "1-3" and header["prefix"] == PREFIXES and header["dtype"] == "float32"


def test_payload_refuses_what_is_not_for_this_receiver(pair):
  from kvjax.lm.droidspeak import payload as pl

  sender, receiver = pair
  data = pl.encode(_sent(pair), sender)
  with pytest.raises(pl.PayloadError, match="another architecture"):
    pl.decode(data, tiny.model("llama", n_layers=L + 1), sender=sender)
  no_tok = lm.init(receiver.cfg, seed=0)
  with pytest.raises(pl.PayloadError, match="another tokenizer"):
    pl.decode(data, no_tok)
  with pytest.raises(pl.PayloadError, match="another sender than the expected one"):
    pl.decode(data, receiver, sender=receiver)
  with pytest.raises(pl.PayloadError, match=r"prefix \(\[11, 5\] tokens per row\) is not"):
    pl.decode(data, receiver, prefix=[PREFIXES[0], PREFIXES[1][:-1]])


def test_payload_of_another_format_version_is_refused(pair):
  """A format-1 payload (K/V as [R, B, P, K, H], before the cache layout moved kv heads before
  slots) is refused with both versions named, never reinterpreted."""
  import json
  import struct

  from kvjax.lm.droidspeak import payload as pl

  sender, receiver = pair
  data = pl.encode(_sent(pair), sender)
  (n,) = struct.unpack("<I", data[8:12])
  header = json.loads(data[12 : 12 + n])
  header["format"] = 1
  head = json.dumps(header).encode()
  old = data[:8] + struct.pack("<I", len(head)) + head + data[12 + n :]
  with pytest.raises(
    pl.PayloadError,
    match=r"format version 1, but this kvjax reads format "
    r"version 2",
  ):
    pl.decode(old, receiver)


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: d[:-7], "truncated or padded payload"),
    (lambda d: d[:20], "truncated payload: the header needs"),
    (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "SHA-256 does not match"),
    (lambda d: b"GARBAGE!" + d[8:], "not a kvjax DroidSpeak payload"),
    (lambda d: d[:13] + b"}" + d[14:], "corrupt payload header"),
  ],
)
def test_payload_refuses_damaged_bytes(pair, damage, message):
  from kvjax.lm.droidspeak import payload as pl

  sender, receiver = pair
  data = pl.encode(_sent(pair), sender)
  with pytest.raises(pl.PayloadError, match=message):
    pl.decode(damage(data), receiver)


# --- compare runs (kvjax.lm.droidspeak.profile) --------------------------------------

PROMPT = [int(x) for x in np.random.default_rng(5).integers(3, 200, 40)]


def test_compare_full_plan_matches_lm_score(pair):
  from kvjax.lm.droidspeak import profile as run

  sender, receiver = pair
  r = run.compare(
    sender, receiver, ds.Plan.full(L), PROMPT, eval_tokens=8, max_new_tokens=6, repeats=1
  )
  logits = np.asarray(lm.score(receiver, PROMPT))
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  want = -np.mean([logp[i - 1, PROMPT[i]] for i in range(len(PROMPT) - 8, len(PROMPT))])
  np.testing.assert_allclose(r["loss_full"], want, rtol=1e-5)
  np.testing.assert_allclose(r["loss_reuse"], want, rtol=1e-5)
  assert r["tokens"] == r["tokens_full"] and r["agreement"] == 1.0 and len(r["tokens"]) == 6
  assert (
    r["tokens_full"] == lm.generate(receiver, [PROMPT], max_new_tokens=6, stop_tokens=[]).tokens[0]
  )
  assert r["prefix_tokens"] == len(PROMPT) - 9 and r["prefill_s_full"] > 0


def test_compare_reuse_differs_from_full(pair):
  from kvjax.lm.droidspeak import profile as run

  sender, receiver = pair
  r = run.compare(
    sender, receiver, ds.Plan.reuse_all(L), PROMPT, eval_tokens=8, max_new_tokens=0, repeats=1
  )
  assert r["loss_reuse"] != r["loss_full"] and np.isfinite(r["loss_reuse"])
  assert r["recomputed_layers"] == [] and r["tokens"] == []
  with pytest.raises(ValueError, match="needs at least 10"):
    run.compare(sender, receiver, ds.Plan.full(L), PROMPT[:9], eval_tokens=8)


# --- kvjax droidspeak {run,send,receive} --------------------------------------------------

TEXT = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def pair_dirs(pair, tmp_path_factory):
  root = tmp_path_factory.mktemp("pair")
  for name, model in zip(("sender", "receiver"), pair):
    lm.save(model, str(root / name))
  return str(root / "sender"), str(root / "receiver")


def droidspeak_run(sender: str, receiver: str, plan: str, *flags):
  """`kvjax droidspeak run` of the saved pair on TEXT with --plan plan -> (code, out, err)."""
  return cli(
    "droidspeak",
    "run",
    "--sender",
    sender,
    "--receiver",
    receiver,
    "--plan",
    plan,
    "--prompt",
    TEXT,
    *flags,
  )


def test_cli_run_json(pair_dirs, pair):
  import json

  s, r = pair_dirs
  code, out, err = droidspeak_run(
    s,
    r,
    "full",
    "--eval-tokens",
    16,
    "--max-new-tokens",
    5,
    "--repeats",
    1,
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  keys = {
    "prefill_s_full",
    "prefill_s_reuse",
    "prefill_speedup",
    "loss_full",
    "loss_reuse",
    "tokens",
    "text",
    "agreement",
    "plan",
  }
  assert keys <= set(got) and got["plan"] == "0-4" and got["loss_full"] == got["loss_reuse"]
  want = lm.generate(pair[1], TEXT, max_new_tokens=5, stop_tokens=[]).tokens[0]
  assert got["tokens"] == want and got["prefill_speedup"] > 0


def _receive_args(receiver: str, sender: str) -> list:
  """`python -m kvjax droidspeak receive` of TEXT's 6-token continuation, --json."""
  import sys

  return [
    sys.executable,
    "-m",
    "kvjax",
    "droidspeak",
    "receive",
    "--receiver",
    receiver,
    "--sender",
    sender,
    "--prompt",
    TEXT,
    "--max-new-tokens",
    6,
    "--json",
  ]


def _receive_over_tcp(recv: list, sender: str) -> dict:
  """Runs `recv` listening in a process of its own (port 0: it prints the port) and `send
  --plan 1-3` here -> the receiver's --json output."""
  import json
  import subprocess

  proc = subprocess.Popen(
    [str(a) for a in recv + ["--port", 0, "--timeout", 120]],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "XLA_FLAGS": ""},
  )
  try:
    line = proc.stderr.readline()
    assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()
    port = int(line.rsplit(":", 1)[1])
    code, _, err = cli(
      "droidspeak", "send", "--sender", sender, "--plan", "1-3", "--prompt", TEXT, "--port", port
    )
    assert code == 0, err
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  return json.loads(out)


def _receive_from_file(recv: list, sender: str, plan: str, path) -> dict:
  """`send --plan plan --out path` then `recv --in path` -> the receiver's --json output."""
  import json

  code, _, err = cli(
    "droidspeak", "send", "--sender", sender, "--plan", plan, "--prompt", TEXT, "--out", path
  )
  assert code == 0, err
  code, out, err = cli(*recv[3:], "--in", path)
  assert code == 0, err
  return json.loads(out)


def test_cli_send_and_receive_in_two_processes(pair_dirs, pair, tmp_path):
  """receive listens in a process of its own (port 0: it prints the port), send runs here; the
  file route gives the same continuation, and with a full plan it is the receiver's own."""
  s, r = pair_dirs
  recv = _receive_args(r, s)
  tcp = _receive_over_tcp(recv, s)
  assert tcp["plan"] == "1-3" and tcp["recomputed_layers"] == [1, 2] and len(tcp["tokens"]) == 6
  assert _receive_from_file(recv, s, "1-3", tmp_path / "p.bin")["tokens"] == tcp["tokens"]
  full = _receive_from_file(recv, s, "full", tmp_path / "full.bin")
  assert full["tokens"] == lm.generate(pair[1], TEXT, max_new_tokens=6, stop_tokens=[]).tokens[0]


def test_cli_errors(pair_dirs, tmp_path):
  s, r = pair_dirs
  code, _, err = cli("droidspeak", "run", "--sender", s, "--receiver", r, "--prompt", TEXT)
  assert code == 2 and "--plan" in err
  code, _, err = droidspeak_run(s, r, "0-9")
  assert code == 1 and "group [0, 9) is not a non-empty layer range" in err
  code, _, err = cli(
    "droidspeak",
    "send",
    "--sender",
    s,
    "--plan",
    "full",
    "--prompt-file",
    tmp_path / "none.txt",
    "--out",
    tmp_path / "p.bin",
  )
  assert code == 2 and "none.txt: no such file" in err
  (tmp_path / "junk.bin").write_bytes(b"not a payload")
  code, _, err = cli(
    "droidspeak", "receive", "--receiver", r, "--prompt", TEXT, "--in", tmp_path / "junk.bin"
  )
  assert code == 1 and "not a kvjax DroidSpeak payload" in err
  code, _, err = cli(
    "droidspeak", "receive", "--receiver", r, "--prompt", TEXT, "--port", 0, "--timeout", 1
  )
  assert code == 1 and "no sender connected" in err
  port = int(err.split("no sender connected to 127.0.0.1:")[1].split()[0])
  assert port > 0, err  # the port it listened on, not the 0 it was given


def test_profile_pareto_and_pick(pair):
  from kvjax.lm.droidspeak import profile as run

  sender, receiver = pair
  prompts = run.windows(PROMPT * 2, 2, 30)
  prof = run.profile(
    sender, receiver, prompts, eval_tokens=8, max_new_tokens=4, repeats=1, unions=3, progress=False
  )
  plans = {r["plan"] for r in prof["rows"]}
  singles = {str(p) for p in run.single_groups(L)}
  assert len(singles) == L * (L + 1) // 2 and singles | {"none"} <= plans
  assert all(len(r["groups"]) == 2 for r in prof["rows"] if r["plan"] not in singles | {"none"})
  full = next(r for r in prof["rows"] if r["plan"] == "0-4")
  np.testing.assert_allclose(full["loss_reuse"], full["loss_full"], rtol=1e-6)
  np.testing.assert_allclose(full["advantage_kept"], 1.0, rtol=1e-4)
  assert full["agreement"] == 1.0
  # the front: each plan faster than the next and worse in loss
  front = [next(r for r in prof["rows"] if r["plan"] == p) for p in prof["pareto"]]
  assert all(
    a["prefill_s_reuse"] <= b["prefill_s_reuse"] and a["loss_reuse"] > b["loss_reuse"]
    for a, b in itertools.pairwise(front)
  )
  assert run.pareto(
    [
      {"plan": "a", "prefill_s_reuse": 1, "loss_reuse": 2},
      {"plan": "b", "prefill_s_reuse": 2, "loss_reuse": 3},
      {"plan": "c", "prefill_s_reuse": 3, "loss_reuse": 1},
    ]
  ) == ["a", "c"]
  rows = {
    "rows": [
      dict(plan="none", prefill_s_reuse=1, prefill_speedup=9, loss_reuse=5.0, advantage_kept=0.2),
      dict(plan="0-1", prefill_s_reuse=2, prefill_speedup=4, loss_reuse=4.1, advantage_kept=0.95),
      dict(plan="0-4", prefill_s_reuse=8, prefill_speedup=1, loss_reuse=4.0, advantage_kept=1.0),
    ]
  }
  assert run.pick(rows) == "0-1" and run.pick(rows, min_kept=0.99) == "0-4"
  assert run.pick(rows, min_speedup=5) == "none" and run.pick(rows, min_speedup=3) == "0-1"
  with pytest.raises(ValueError, match="no profiled plan reaches a 10x"):
    run.pick(rows, min_speedup=10)


def test_cli_profile_then_auto_plan(pair_dirs, tmp_path, monkeypatch):
  import json

  s, r = pair_dirs
  monkeypatch.setenv("KVJAX_DROIDSPEAK_DIR", str(tmp_path / "profiles"))
  (tmp_path / "t.txt").write_text(TEXT * 3, encoding="utf-8")
  code, out, err = cli(
    "droidspeak",
    "profile",
    "--sender",
    s,
    "--receiver",
    r,
    "--text",
    tmp_path / "t.txt",
    "--prompts",
    2,
    "--prefix-tokens",
    21,  # windows, caches and plans of test_profile_pareto_and_pick: its compiled programs
    "--eval-tokens",
    8,
    "--max-new-tokens",
    4,
    "--repeats",
    1,
    "--unions",
    0,
    "--no-progress",
    "--json",
  )
  assert code == 0, err
  prof = json.loads(out)
  assert prof["pareto"] and {"none", "0-4"} <= {row["plan"] for row in prof["rows"]}
  assert len(os.listdir(tmp_path / "profiles")) == 1  # stored for --plan auto
  want = json.loads(json.dumps(prof))
  code, out, err = droidspeak_run(
    s,
    r,
    "auto",
    "--min-speedup",
    0.01,
    "--eval-tokens",
    8,
    "--max-new-tokens",
    2,
    "--repeats",
    1,
    "--json",
  )
  assert code == 0, err
  from kvjax.lm.droidspeak import profile as run

  assert json.loads(out)["plan"] == run.pick(want, min_speedup=0.01)  # lowest loss of all
  code, _, err = droidspeak_run(s, r, "0-1", "--min-kept", 0.5)
  assert code == 2 and "only apply with --plan auto" in err
