"""Model resolution: the bundled GGUF model, local checkpoints, errors."""

import pytest
import torch

from gradproj import models
from gradproj.errors import UserError

BUNDLED = "bundled:smollm2-135m-instruct"


@pytest.mark.slow
def test_bundled_model_is_converted_once_and_loads_offline():
    first = models.resolve_checkpoint(BUNDLED, 0)
    stamp = (models.bundled_model_dir(BUNDLED) / "config.json").stat().st_mtime_ns
    again = models.resolve_checkpoint(BUNDLED, 0)
    assert first == again
    assert (models.bundled_model_dir(BUNDLED) / "config.json").stat().st_mtime_ns == stamp
    model = models.load_model(first, "sft", torch.float32, "cpu")
    tokenizer = models.load_tokenizer(first)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_bundled_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown bundled model"):
        models.resolve_checkpoint("bundled:gpt-5", 0)


def test_checkpoint_out_of_range_names_the_count(tiny_llama):
    with pytest.raises(UserError, match=r"has 1 checkpoint\(s\), numbered 0..0"):
        models.resolve_checkpoint(str(tiny_llama), 1)


def test_dtype_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
