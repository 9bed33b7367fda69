"""SmolLM2-135M-Instruct as an HF folder, converted from the GGUF in Strata's cache by Strata's converter
(test-only), with a Hermes/Qwen-style chat template that offers tools: the real model of the slow tests."""

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
    """The GGUF as an HF folder by Strata's converter (weights dequantized exactly; tests/weights checks it
    against transformers' own GGUF reading), with HERMES_TEMPLATE as its chat template."""
    from strata.weights.gguf_convert import convert_gguf

    convert_gguf(smollm2_gguf(), dest, overwrite=True, keep_quantized=False)
    (dest / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    cfg_path = dest / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg))
    return dest
