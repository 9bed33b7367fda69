"""Chat templates render exactly as transformers' apply_chat_template, in jinja2's sandbox."""

import json

import pytest

from strata.tokenizer import ChatTemplateError, Tokenizer
from tests.models.conftest import save_tiny_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_STYLE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STRICT = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there!  "},
    {"role": "assistant", "content": "Hi. Ünïcode ok."},
    {"role": "user", "content": "Bye"},
]


def _folder(tmp_path, template):
    save_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return tmp_path


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN_STYLE], ids=["llama3", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(tmp_path, template, add_generation_prompt):
    path = _folder(tmp_path, template)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = Tokenizer(str(path))
    for msgs in (CONVERSATION, CONVERSATION[1:2]):
        want = ref.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt) == want


def test_bundled_model_template_like_transformers():
    from strata.engine.llm_engine import BUNDLED_MODEL

    if not (BUNDLED_MODEL and __import__("os").path.exists(BUNDLED_MODEL + "/tokenizer.json")):
        pytest.skip("bundled model not built yet")
    ref = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    ours = Tokenizer(BUNDLED_MODEL)
    for msgs in (CONVERSATION, CONVERSATION[1:2]):
        want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(msgs, add_generation_prompt=True) == want
        assert ours.encode_chat(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)


def test_raise_exception_is_a_clear_error(tmp_path):
    ours = Tokenizer(str(_folder(tmp_path, STRICT)))
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        ours.apply_chat_template(CONVERSATION)


def test_sandbox_blocks_attribute_escape(tmp_path):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    ours = Tokenizer(str(_folder(tmp_path, evil)))
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CONVERSATION)
