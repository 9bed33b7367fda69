"""SmolLM2-135M-Instruct as an HF folder, dequantized from the GGUF in Strata's cache through transformers' GGUF
reader (test-only), with a Hermes/Qwen-style chat template that offers tools: the real model of the slow tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from strata.layers.quant_native import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen 2.5's tool prompt, shortened: tools in <tools>, calls in <tool_call>, results in <tool_response>.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou are a helpful assistant. You may call one or more functions to assist "
    "with the user query. Function signatures are within <tools></tools> XML tags:\n<tools>"
    "{%- for t in tools %}\n{{ t.function | tojson }}{%- endfor %}\n</tools>\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}\n<|im_start|>{{ m.role if m.role != 'tool' else 'user' }}\n"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}"
    "{%- elif m.role == 'tool' %}\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- else %}\n{{ m.content }}{%- endif %}<|im_end|>{%- endfor %}"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)


def smollm2_gguf() -> Path:
    path = Path(os.environ.get("STRATA_SMOLLM2_GGUF") or cache_dir() / "smollm2" / GGUF_NAME)
    if not path.is_file():
        pytest.skip(f"{path} not available (set STRATA_SMOLLM2_GGUF)")
    return path


def build_smollm2_folder(dest: Path) -> Path:
    """The GGUF's weights (bf16) as model.safetensors, its config and tokenizer, and HERMES_TEMPLATE."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dest.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tok.save_pretrained(dest)
    (dest / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest
