"""Decode and prefill speed: kvjax vs Hugging Face transformers, same checkpoint, one run.

    python benchmarks/decode.py                                   # ~10M Llama, CPU, float32
    python benchmarks/decode.py --config 1b --batches 1,8,32      # ~1B Llama, bf16, on a GPU
    python benchmarks/decode.py --peers hf,llamacpp,gemma \
        --llamacpp-python PEERS/llama/bin/python \
        --llamacpp-converter LLAMA_CPP/convert_hf_to_gguf.py \
        --gemma-python PEERS/gemma/bin/python                     # + llama.cpp and gemma

Builds a random Llama-architecture checkpoint with transformers (`save_pretrained` to a temp
dir), loads it with `kvjax.lm.load` and `LlamaForCausalLM.from_pretrained`, and measures the
grid of `kvjax.lm.bench` (the `kvjax bench` subcommand's measurement) with HF as the peer,
interleaved cell by cell on the same random prompts:

  decode (batch B, context C): ms per greedy step after a C-token prompt, every row running
         --new-tokens steps. kvjax: `lm.generate`'s jitted decode loop (its stats; compilation
         excluded). HF: N cached greedy forward steps (`model(tok, past_key_values=cache)`, the
         steps `generate` runs, without its per-token overhead), PyTorch eager under
         torch.inference_mode, after an untimed prefill of the same prompts.
  prefill (P tokens, one prompt): kvjax `lm.generate`'s prefill; HF one forward with
         use_cache=True, logits_to_keep=1.

Every decode cell also gets its memory-bandwidth bound: the bytes a step reads (weights + K/V
at the mean context) over the bandwidth of a large array copy measured in the same run, and
the fraction of it each side reaches. Medians of --repeats rounds after a warm-up round.

Optional peers, each in its own virtual environment (never part of CI; README of benchmarks/
says how to make them), answering over a pipe (peer_protocol.py) so that they too interleave:
  llamacpp: llama.cpp through llama-cpp-python (peer_llamacpp.py) on the same checkpoint,
         converted to GGUF by llama.cpp's own converter, weights and K/V in the benchmark dtype.
  gemma: the gemma library's sampler (peer_gemma.py) on a random Gemma-2 of the same shape; kvjax
         runs a random HF Gemma-2 checkpoint of that shape for this table (the `gemma2` report).

Writes <out>/decode_<backend>.json and .md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
from peer_protocol import ProcessPeer
from report import cpu_name, write

HERE = os.path.dirname(os.path.abspath(__file__))


def llama(
  *, V: int, D: int, F: int, L: int, N: int, K: int, H: int, max_position: int = 8192, **extra
) -> dict:
  """The HF LlamaConfig fields of a model of these sizes (kvjax's axis letters: V vocab, D model,
  F ffn, L layers, N heads, K kv heads, H head dim) and `extra` fields."""
  return dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=N,
    num_key_value_heads=K,
    head_dim=H,
    max_position_embeddings=max_position,
    **extra,
  )


# HF LlamaConfig fields of each benchmark model.
CONFIGS = {
  # 10.5M parameters: 6.3M in the layers, 4.2M in the untied embedding and head.
  "10m": llama(V=8192, D=256, F=768, L=8, N=8, K=4, H=32),
  # 1.24B parameters: the shape of Llama-3.2-1B (tied embeddings), random weights.
  "1b": llama(
    V=128256, D=2048, F=8192, L=16, N=32, K=8, H=64, rope_theta=500000.0, tie_word_embeddings=True
  ),
  # 0.14M parameters: a smoke run of this script (tests/project/test_benchmarks.py), not a
  # benchmark.
  "tiny": llama(V=512, D=64, F=128, L=2, N=4, K=2, H=16, max_position=512),
}
DEFAULT_DTYPE = {"10m": "float32", "1b": "bfloat16", "tiny": "float32"}
# The Gemma-2 features that the `gemma` peer's table adds to a config's shape (HF Gemma2Config).
GEMMA2 = dict(
  attn_logit_softcapping=50.0,
  final_logit_softcapping=30.0,
  sliding_window=4096,
  tie_word_embeddings=True,
)
PEERS = ("hf", "llamacpp", "gemma")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
  from kvjax.lm.bench import parse_ints

  ap = argparse.ArgumentParser(
    prog="python benchmarks/decode.py", description=__doc__.split("\n")[0]
  )
  ap.add_argument("--config", choices=sorted(CONFIGS), default="10m")
  ap.add_argument("--dtype", choices=DTYPES, help="default: float32 for 10m, bfloat16 for 1b")
  ap.add_argument("--batches", default="1,4,8,16", help="decode batch sizes")
  ap.add_argument("--contexts", default="256,1024,4096", help="decode context lengths")
  ap.add_argument("--prefill", default="256,1024,4096", help="prefill prompt lengths")
  ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per cell")
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  ap.add_argument(
    "--peers", default="hf", help=f"comma-separated, of {','.join(PEERS)} (default: hf)"
  )
  ap.add_argument("--llamacpp-python", help="python of the venv with llama-cpp-python")
  ap.add_argument(
    "--llamacpp-converter",
    help="llama.cpp's convert_hf_to_gguf.py (the source "
    "tree of the installed llama-cpp-python's llama.cpp)",
  )
  ap.add_argument("--gemma-python", help="python of the venv with PyPI gemma")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
  ap.add_argument(
    "--allow-cpu-1b",
    action="store_true",
    help="run --config 1b even when JAX's backend is the CPU (slow, ~5 GB)",
  )
  args = ap.parse_args(argv)
  args.dtype = args.dtype or DEFAULT_DTYPE[args.config]
  args.peers = tuple(p for p in args.peers.split(",") if p)
  bad = [p for p in args.peers if p not in PEERS]
  if bad or not args.peers:
    ap.error(
      f"--peers: expected a comma-separated list of {', '.join(PEERS)}; got "
      f"{','.join(args.peers) or 'nothing'}"
    )
  need = {"llamacpp": ("llamacpp_python", "llamacpp_converter"), "gemma": ("gemma_python",)}
  for peer, names in need.items():
    for name in names if peer in args.peers else ():
      path = getattr(args, name)
      if not path or not os.path.isfile(path):
        ap.error(
          f"--peers {peer} needs --{name.replace('_', '-')} (an existing file); got {path!r}"
        )
  if "llamacpp" in args.peers and args.dtype == "float16":
    ap.error("--peers llamacpp: use --dtype float32 or bfloat16 (the converter's f32 / bf16)")
  for name in ("batches", "contexts", "prefill"):
    try:
      setattr(args, name, parse_ints(getattr(args, name)))
    except ValueError as err:
      ap.error(f"--{name}: {err}")
  for name in ("new_tokens", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  if args.config == "1b" and jax.default_backend() == "cpu" and not args.allow_cpu_1b:
    ap.error(
      "--config 1b is meant for a GPU/TPU; JAX's backend here is the CPU "
      "(pass --allow-cpu-1b to run it anyway)"
    )
  return args


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_checkpoint(config: str, dtype: str, path: str, seed: int, family: str = "llama") -> int:
  """Saves a randomly initialised LlamaForCausalLM (or, family "gemma2", Gemma2ForCausalLM with
  the config's shape and GEMMA2's features) to path; returns its parameter count."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  if family == "gemma2":
    hf_cfg = transformers.Gemma2Config(**gemma2_shape(config))
    cls = transformers.Gemma2ForCausalLM
  else:
    hf_cfg, cls = transformers.LlamaConfig(**CONFIGS[config]), transformers.LlamaForCausalLM
  with torch.device(torch_device()):
    model = cls._from_config(hf_cfg, dtype=getattr(torch, dtype))
  model.save_pretrained(path)
  n = sum(p.numel() for p in model.parameters())
  del model
  return n


def gemma2_shape(config: str) -> dict:
  """The HF Gemma2Config fields of the gemma peer's model: the config's shape, Gemma-2 features
  (query scaled by 1/sqrt(head_dim), as the gemma library's default)."""
  shape = {k: v for k, v in CONFIGS[config].items() if k not in ("rope_theta",)}
  return {**shape, **GEMMA2, "query_pre_attn_scalar": shape["head_dim"]}


def llamacpp_peer(args, path: str, work: str) -> ProcessPeer:
  """Converts the checkpoint at path to GGUF with llama.cpp's converter and starts the worker.
  The converter needs a tokenizer: the bundled Shakespeare BPE is copied in (its 4,096 ids
  are padded to the config's vocabulary by the converter; the benchmark feeds ids, not text)."""
  from kvjax.lm.model import resolve

  tok, _ = resolve("shakespeare")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok, name), os.path.join(path, name))
  gguf = os.path.join(work, "model.gguf")
  outtype = {"float32": "f32", "bfloat16": "bf16"}[args.dtype]
  print(f"converting to GGUF ({outtype}) with {args.llamacpp_converter}", file=sys.stderr)
  subprocess.run(
    [
      args.llamacpp_python,
      os.path.join(HERE, "peer_llamacpp.py"),
      "convert",
      "--hf",
      path,
      "--converter",
      args.llamacpp_converter,
      "--out",
      gguf,
      "--outtype",
      outtype,
    ],
    check=True,
    stdout=sys.stderr,
  )
  kv_type = "f32" if args.dtype == "float32" else "f16"
  return ProcessPeer(
    [
      args.llamacpp_python,
      os.path.join(HERE, "peer_llamacpp.py"),
      "serve",
      "--gguf",
      gguf,
      "--threads",
      str(args.threads),
      "--kv-type",
      kv_type,
    ],
    "llama.cpp",
  )


def gemma_peer(args) -> ProcessPeer:
  return ProcessPeer(
    [
      args.gemma_python,
      os.path.join(HERE, "peer_gemma.py"),
      "serve",
      "--shape",
      json.dumps(gemma2_shape(args.config)),
      "--dtype",
      args.dtype,
      "--seed",
      str(args.seed),
    ],
    "gemma",
  )


def load_models(path: str, dtype: str):
  """The checkpoint as (kvjax Model, transformers model in eval mode on torch_device())."""
  import torch
  import transformers

  from kvjax import lm

  transformers.utils.logging.disable_progress_bar()
  kv = lm.load(path, dtype=jnp.dtype(dtype))
  hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
  return kv, hf.to(torch_device()).eval()


def _sync(device) -> None:
  if device.type == "cuda":
    import torch

    torch.cuda.synchronize()


def hf_peer(model):
  """The peer for `kvjax.lm.bench.run`: HF seconds per decode step or of a prefill."""
  import torch

  device = model.device

  def timed(fn):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0

  def peer(kind: str, ids: np.ndarray, new_tokens: int) -> float:
    x = torch.as_tensor(ids, device=device)
    with torch.inference_mode():
      if kind == "prefill":
        return timed(lambda: model(x, use_cache=True, logits_to_keep=1))
      out = model(x, use_cache=True, logits_to_keep=1)  # the prompt's cache (not timed)
      state = {"cache": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

      def steps():  # greedy cached steps, as generate's loop runs them, without its overhead
        for _ in range(new_tokens):
          step = model(state["tok"], past_key_values=state["cache"], use_cache=True)
          state["cache"], state["tok"] = (
            step.past_key_values,
            step.logits[:, -1].argmax(-1, keepdim=True),
          )

      return timed(steps) / new_tokens

  return peer


def machine_info(hf) -> dict:
  import flax
  import jaxlib
  import torch
  import transformers

  return dict(
    processor=cpu_name(),
    cpu_count=os.cpu_count(),
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    flax=flax.__version__,
    torch=torch.__version__,
    transformers=transformers.__version__,
    jax_backend=jax.default_backend(),
    jax_devices=[str(d) for d in jax.devices()],
    torch_device=str(hf.device),
    torch_threads=torch.get_num_threads(),
    torch_cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    hf_attn_implementation=hf.config._attn_implementation,
    load_average_start=list(os.getloadavg()),
  )


def main(argv=None) -> dict:
  from kvjax import lm
  from kvjax.lm import bench

  args = parse_args(argv)
  t_start = time.perf_counter()
  grid = bench.Grid(
    batches=args.batches,
    contexts=args.contexts,
    prefill=args.prefill,
    new_tokens=args.new_tokens,
    repeats=args.repeats,
    seed=args.seed,
  )
  progress = lambda msg: print(msg, file=sys.stderr, flush=True)
  started = []
  with tempfile.TemporaryDirectory(prefix="kvjax_bench_") as work:
    path = os.path.join(work, "llama")
    print(f"building a random {args.config} Llama checkpoint ({args.dtype})", file=sys.stderr)
    n_params = build_checkpoint(args.config, args.dtype, path, args.seed)
    kv, hf = load_models(path, args.dtype)
    peers = {"HF": hf_peer(hf)} if "hf" in args.peers else {}
    try:
      if "llamacpp" in args.peers:
        started.append(llamacpp_peer(args, path, work))
        peers["llama.cpp"] = started[-1]
      if "gemma" in args.peers:
        started.append(gemma_peer(args))
        gpath = os.path.join(work, "gemma2")
        build_checkpoint(args.config, args.dtype, gpath, args.seed, family="gemma2")
        kv_gemma = lm.load(gpath, dtype=jnp.dtype(args.dtype))
      info = machine_info(hf)
      info["peers"] = {p.name: p.info for p in started}
      report = bench.run(kv, grid, peers=peers, progress=progress) if peers else None
      if "gemma" in args.peers:
        progress("Gemma-2 shape: kvjax vs the gemma library's sampler")
        gemma = bench.run(kv_gemma, grid, peers={"gemma": started[-1]}, progress=progress)
    finally:
      for p in started:
        p.close()
  info["load_average_end"] = list(os.getloadavg())
  report = report or dict(
    machine=gemma["machine"],
    bandwidth_gbs=gemma["bandwidth_gbs"],
    grid=gemma["grid"],
    peers=[],
    cells=[],
  )
  report.update(
    machine={**report["machine"], **info},
    config=dict(name=args.config, hf=CONFIGS[args.config], n_params=n_params, dtype=args.dtype),
    runtime_s=time.perf_counter() - t_start,
  )
  m = report["machine"]
  head = (
    f"# decode benchmark: kvjax vs {', '.join(report['peers'] or ['gemma'])} "
    f"({m['jax_backend']})\n\n"
    f"{args.config} Llama ({n_params / 1e6:,.1f}M params, {args.dtype}), greedy, "
    f"{args.new_tokens} decode steps per cell, median of {args.repeats} interleaved "
    f"rounds. {m['processor']} ({m['cpu_count']} cpus), jax {m['jax']} on "
    f"{m['jax_devices'][0]}, torch {m['torch']} on {m['torch_device']} (transformers "
    f"{m['transformers']}, {m['hf_attn_implementation']} attention, "
    f"{m['torch_threads']} threads). Load average at start "
    f"{m['load_average_start'][0]:.2f}, end {m['load_average_end'][0]:.2f}.\n\n"
  )
  for name, peer_info in info["peers"].items():
    shown = {k: v for k, v in peer_info.items() if k != "system_info"}
    head += f"{name}: {json.dumps(shown)}\n\n"
  table = head + (bench.markdown(report) if report["cells"] else "")
  if "gemma" in args.peers:
    report["gemma2"] = dict(gemma, hf=gemma2_shape(args.config))
    table += (
      f"\n## Gemma-2 shape ({args.config}'s shape with soft-caps, alternating "
      f"{GEMMA2['sliding_window']}-token sliding windows, tied embeddings): kvjax vs "
      f"the gemma library's sampler\n\n" + bench.markdown(gemma)
    )
  print(table)
  stem = write(args.out, "decode", report, table)
  print(f"wrote {stem}.json and {stem}.md in {report['runtime_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
