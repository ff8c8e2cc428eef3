"""Decode and prefill speed: kvjax vs Hugging Face transformers, same checkpoint, one run.

    python benchmarks/decode.py                                   # ~10M Llama, CPU, float32
    python benchmarks/decode.py --config 1b --batches 1,8,32      # ~1B Llama, bf16, on a GPU

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

Writes <out>/decode_<backend>.json and .md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from report import cpu_name, write  # noqa: E402

# HF LlamaConfig fields of each benchmark model.
CONFIGS = {
    # 10.5M parameters: 6.3M in the layers, 4.2M in the untied embedding and head.
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                max_position_embeddings=8192),
    # 1.24B parameters: the shape of Llama-3.2-1B (tied embeddings), random weights.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True),
}
DEFAULT_DTYPE = {"10m": "float32", "1b": "bfloat16"}
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
  from kvjax.lm.bench import parse_ints
  ap = argparse.ArgumentParser(prog="python benchmarks/decode.py",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", choices=sorted(CONFIGS), default="10m")
  ap.add_argument("--dtype", choices=DTYPES, help="default: float32 for 10m, bfloat16 for 1b")
  ap.add_argument("--batches", default="1,4,8,16", help="decode batch sizes")
  ap.add_argument("--contexts", default="256,1024,4096", help="decode context lengths")
  ap.add_argument("--prefill", default="256,1024,4096", help="prefill prompt lengths")
  ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per cell")
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results"))
  ap.add_argument("--allow-cpu-1b", action="store_true",
                  help="run --config 1b even when JAX's backend is the CPU (slow, ~5 GB)")
  args = ap.parse_args(argv)
  args.dtype = args.dtype or DEFAULT_DTYPE[args.config]
  for name in ("batches", "contexts", "prefill"):
    try:
      setattr(args, name, parse_ints(getattr(args, name)))
    except ValueError as err:
      ap.error(f"--{name}: {err}")
  for name in ("new_tokens", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  if args.config == "1b" and jax.default_backend() == "cpu" and not args.allow_cpu_1b:
    ap.error("--config 1b is meant for a GPU/TPU; JAX's backend here is the CPU "
             "(pass --allow-cpu-1b to run it anyway)")
  return args


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_checkpoint(config: str, dtype: str, path: str, seed: int) -> int:
  """Saves a randomly initialised LlamaForCausalLM to path; returns its parameter count."""
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(**CONFIGS[config])
  with torch.device(torch_device()):
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=getattr(torch, dtype))
  model.save_pretrained(path)
  n = sum(p.numel() for p in model.parameters())
  del model
  return n


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
          state["cache"], state["tok"] = step.past_key_values, step.logits[:, -1].argmax(
              -1, keepdim=True)

      return timed(steps) / new_tokens

  return peer


def machine_info(hf) -> dict:
  import flax
  import jaxlib
  import torch
  import transformers
  return dict(
      processor=cpu_name(), cpu_count=os.cpu_count(), jax=jax.__version__,
      jaxlib=jaxlib.__version__, flax=flax.__version__, torch=torch.__version__,
      transformers=transformers.__version__, jax_backend=jax.default_backend(),
      jax_devices=[str(d) for d in jax.devices()], torch_device=str(hf.device),
      torch_threads=torch.get_num_threads(),
      torch_cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      hf_attn_implementation=hf.config._attn_implementation,
      load_average_start=list(os.getloadavg()))


def main(argv=None) -> dict:
  from kvjax.lm import bench
  args = parse_args(argv)
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="kvjax_bench_") as path:
    print(f"building a random {args.config} Llama checkpoint ({args.dtype})", file=sys.stderr)
    n_params = build_checkpoint(args.config, args.dtype, path, args.seed)
    kv, hf = load_models(path, args.dtype)
  info = machine_info(hf)
  grid = bench.Grid(batches=args.batches, contexts=args.contexts, prefill=args.prefill,
                    new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed)
  report = bench.run(kv, grid, peer=hf_peer(hf),
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
  info["load_average_end"] = list(os.getloadavg())
  report.update(machine={**report["machine"], **info},
                config=dict(name=args.config, hf=CONFIGS[args.config], n_params=n_params,
                            dtype=args.dtype),
                runtime_s=time.perf_counter() - t_start)
  for c in report["cells"]:
    if c["kind"] == "decode":
      c["peer_fraction"] = c["bound_s"] / c["peer_s"]
  m = report["machine"]
  head = (f"# decode benchmark: kvjax vs transformers ({m['jax_backend']})\n\n"
          f"{args.config} Llama ({n_params / 1e6:,.1f}M params, {args.dtype}), greedy, "
          f"{args.new_tokens} decode steps per cell, median of {args.repeats} interleaved "
          f"rounds. {m['processor']} ({m['cpu_count']} cpus), jax {m['jax']} on "
          f"{m['jax_devices'][0]}, torch {m['torch']} on {m['torch_device']} (transformers "
          f"{m['transformers']}, {m['hf_attn_implementation']} attention, "
          f"{m['torch_threads']} threads). Load average at start "
          f"{m['load_average_start'][0]:.2f}, end {m['load_average_end'][0]:.2f}.\n\n")
  table = head + bench.markdown(report, peer="HF")
  print(table)
  stem = write(args.out, "decode", report, table)
  print(f"wrote {stem}.json and {stem}.md in {report['runtime_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
