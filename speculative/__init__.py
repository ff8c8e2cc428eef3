"""EAGLE speculative decoding: draft heads, dynamic draft trees, lossless verification.

    from kvjax import lm, speculative
    model = lm.load("shakespeare")
    head = speculative.load_head("shakespeare", model)
    out = speculative.generate(model, head, "ROMEO:", max_new_tokens=64,
                               tree=speculative.TreeSpec(top_k=8, depth=5, total_tokens=32))

Every way a head is read and written is in `kvjax.speculative.formats`: save_head writes
kvjax's own directory (head.json + params/); load_head reads it or a shipped head by name,
and also published heads (SafeAILab EAGLE-1/2 and EAGLE-3 / SpecForge layouts: config.json +
model.safetensors or pytorch_model.bin); export_head writes a published-architecture head
(init_head(..., published=True), `kvjax train eagle --published`) in those layouts for vLLM
and SGLang.
"""

from kvjax.speculative.autotune import default_tree
from kvjax.speculative.formats import export as export_head
from kvjax.speculative.formats import load as load_head
from kvjax.speculative.formats import save as save_head
from kvjax.speculative.generate import auto_tree, generate
from kvjax.speculative.head import HeadConfig, HeadError, LoadedHead, draft_vocabulary
from kvjax.speculative.head import init as init_head
from kvjax.speculative.session import StreamingSession
from kvjax.speculative.tree import Tree, TreeSpec

__all__ = [
  "HeadConfig",
  "HeadError",
  "LoadedHead",
  "StreamingSession",
  "Tree",
  "TreeSpec",
  "auto_tree",
  "default_tree",
  "draft_vocabulary",
  "export_head",
  "generate",
  "init_head",
  "load_head",
  "save_head",
]
