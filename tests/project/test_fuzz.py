"""Property-based tests (hypothesis) of what parses user input: the HF config reader, the
Skeleton-of-Thought point parser, the DroidSpeak payload decoder and the sampling arguments.
Each either accepts its input and returns something in its domain, or raises its own error
type; never another exception. Bounded (max_examples) to stay inside the suite's budget."""

import json
import math
import struct

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvjax import lm
from kvjax.lm import config, hf_config, tiny
from kvjax.lm import droidspeak as ds
from kvjax.lm.droidspeak import payload
from kvjax.lm.sot.points import SkeletonError, parse_points

FAST = settings(
  max_examples=80,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)

JSON = st.recursive(
  st.none()
  | st.booleans()
  | st.integers(-(10**12), 10**12)
  | st.floats(allow_nan=True, allow_infinity=True)
  | st.text(max_size=8),
  lambda inner: (
    st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
  ),
  max_leaves=6,
)

HF = {
  "model_type": "llama",
  "vocab_size": 320,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
  "rms_norm_eps": 1e-6,
  "max_position_embeddings": 512,
  "rope_theta": 10000.0,
  "tie_word_embeddings": False,
}
KEYS = sorted(HF) + [
  "sliding_window",
  "rope_scaling",
  "attention_bias",
  "mlp_bias",
  "hidden_act",
  "layer_types",
]


def in_domain(cfg: config.Config) -> None:
  for name in config.SIZES:
    v = getattr(cfg, name)
    assert isinstance(v, int) and not isinstance(v, bool) and v >= 1, (name, v)
  for name in config.POSITIVE:
    v = getattr(cfg, name)
    assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (name, v)
  assert cfg.n_heads % cfg.n_kv_heads == 0
  assert len(cfg.windows) == cfg.n_layers and all(w >= 0 for w in cfg.windows)


def read_or_named(hf: dict) -> config.Config | None:
  """from_hf(hf) checked to be in its domain, or None when it refused hf naming the file."""
  try:
    cfg = hf_config.from_hf(hf, "fuzz/config.json")
  except config.ConfigError as err:
    assert str(err).startswith("fuzz/config.json: "), err
    return None
  in_domain(cfg)
  return cfg


@FAST
@given(changes=st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=3))
def test_config_reader_accepts_or_names_the_problem(changes):
  read_or_named({**HF, **changes})


NEW_KEYS = [
  "rope_parameters",
  "layer_types",
  "sliding_window",
  "sliding_window_pattern",
  "rope_local_base_freq",
  "query_pre_attn_scalar",
  "use_bidirectional_attention",
  "use_sliding_window",
  "max_window_layers",
  "attention_bias",
  "rope_scaling",
]
ROPE_TABLE = (
  st.integers(-3, 3)
  | st.text(min_size=1, max_size=3)
  | st.lists(JSON, max_size=2)
  | st.fixed_dictionaries({}, optional={"rope_theta": JSON, "rope_type": JSON, "factor": JSON})
)
ROPE_TABLES = st.fixed_dictionaries(
  {}, optional={"full_attention": ROPE_TABLE, "sliding_attention": ROPE_TABLE, "rope_theta": JSON}
)


@FAST
@given(
  family=st.sampled_from(["qwen3", "gemma3_text"]),
  changes=st.dictionaries(st.sampled_from(NEW_KEYS), JSON, max_size=3),
  rope=st.none() | ROPE_TABLES,
)
def test_config_reader_new_families(family, changes, rope):
  """qwen3 and gemma3_text keys (per-layer-type rope_parameters, layer patterns, the local
  RoPE base): accepted into the domain or refused naming the file."""
  hf = {**HF, "model_type": family, **changes}
  if rope is not None:
    hf["rope_parameters"] = rope
  cfg = read_or_named(hf)
  if cfg is None:
    return
  assert cfg.qk_norm
  local = cfg.rope_local_theta
  assert (local is None) == (family == "qwen3")
  assert local is None or (math.isfinite(local) and local > 0)


@FAST
@given(
  changes=st.dictionaries(
    st.sampled_from(
      ["num_local_experts", "num_experts_per_tok", "sliding_window", "intermediate_size"]
    ),
    JSON | st.integers(-2, 9),
    min_size=1,
    max_size=3,
  )
)
def test_expert_fields_accepted_or_named(changes):
  cfg = read_or_named(
    {**HF, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, **changes}
  )
  if cfg is None:
    return
  assert 1 <= cfg.n_experts_per_tok <= cfg.n_experts
  for key, field in (
    ("num_local_experts", "n_experts"),
    ("num_experts_per_tok", "n_experts_per_tok"),
  ):
    if changes.get(key) is not None:  # used as given
      assert getattr(cfg, field) == changes[key]


@FAST
@given(value=JSON | st.floats(-1e9, 1e9))
def test_each_numeric_field_checked(value):
  for key in (
    "rms_norm_eps",
    "rope_theta",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
  ):
    try:
      cfg = hf_config.from_hf({**HF, key: value})
    except config.ConfigError as err:
      assert key in str(err) or "num_attention_heads" in str(err), err
      continue
    in_domain(cfg)
    if value is not None:  # a present value is used as given, never replaced by a default
      got = {
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position,
      }[key]
      assert got == value


LINES = st.lists(
  st.one_of(
    st.text(max_size=20),
    st.builds(
      lambda n, sep, body: f"{n}{sep} {body}",
      st.integers(0, 30),
      st.sampled_from([".", ")", ":", ""]),
      st.text(max_size=15),
    ),
    st.builds(
      lambda b, body: f"{b} {body}",
      st.sampled_from(["-", "*", "•", "**1.**"]),
      st.text(max_size=15),
    ),
  ),
  max_size=14,
)


@FAST
@given(lines=LINES, max_points=st.integers(1, 12))
def test_point_parser_returns_points_or_says_why(lines, max_points):
  text = "\n".join(lines)
  try:
    points = parse_points(text, max_points=max_points)
  except SkeletonError:
    return
  assert 1 <= len(points) <= max_points
  assert all(isinstance(p, str) and p.strip() for p in points)


@pytest.fixture(scope="module")
def sent():
  model = tiny.model("llama", n_layers=4, seed=0)
  tokens = np.array([[5, 9, 12, 40, 7, 0, 0, 0], [44, 2, 90, 16, 8, 3, 1, 6]], np.int32)
  lengths = np.array([5, 8], np.int32)
  capture = ds.capture(model, tokens, lengths, ds.Plan.parse("1-3", 4))
  return model, payload.encode(capture, model)


def _join(header, body: bytes) -> bytes:
  head = json.dumps(header).encode()
  return payload.MAGIC + struct.pack("<I", len(head)) + head + body


@FAST
@given(
  cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
  truncate=st.integers(0, 10**6),
)
def test_damaged_payload_bytes_are_refused(sent, cuts, truncate):
  model, data = sent
  bad = bytearray(data)
  for at, byte in cuts:
    bad[at % len(bad)] = byte
  bad = bytes(bad[: len(bad) - truncate % len(bad)] if truncate % 7 == 0 else bad)
  if bad == data:
    return
  with pytest.raises(payload.PayloadError):
    payload.decode(bad, model)


@FAST
@given(
  key=st.sampled_from(
    ["fingerprint", "prefix", "plan", "n_layers", "padded", "dtype", "tensors", "positions"]
  ),
  value=JSON,
  drop=st.booleans(),
)
def test_payload_header_fields_of_any_value(sent, key, value, drop):
  """A header that still parses (the SHA-256 covers the data, not the header) but whose field
  is missing or holds anything at all: decoded into a capture of the receiver's shapes, or a
  PayloadError."""
  model, data = sent
  header, body = payload.read_header(data)
  if drop:
    header.pop(key)
  else:
    header[key] = value
  try:
    got = payload.decode(_join(header, body), model)
  except payload.PayloadError:
    return
  assert got.k.shape[2] == model.cfg.n_kv_heads and got.k.shape[4] == model.cfg.head_dim


@FAST
@given(
  temperature=st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans()
  ),
  top_k=st.one_of(st.integers(-5, 5000), st.floats(), st.booleans()),
  top_p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2)),
)
def test_sampling_arguments(temperature, top_k, top_p):
  try:
    s = lm.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  except ValueError:
    return
  assert s.temperature == 0 or (math.isfinite(s.temperature) and s.temperature >= 1e-6)
  assert s.top_k >= 0 and 0 < s.top_p <= 1
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  from kvjax.lm.sampling import sample

  tok = np.asarray(sample(logits, jax.random.key(1), s))
  assert tok.shape == (3,) and ((tok >= 0) & (tok < 50)).all()
  if s.greedy:
    assert (tok == np.asarray(logits).argmax(-1)).all()
  elif s.top_k:  # never outside the k most likely
    ranks = (np.asarray(logits) > np.asarray(logits)[np.arange(3), tok][:, None]).sum(-1)
    assert (ranks < s.top_k).all()
