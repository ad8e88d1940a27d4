"""DecoderRunner's placement: a model that ``load_model`` already put on the GPU stays there (``resident``), so no
stage moves its layers back and forth; weights still on the host are weighed against the device's free memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from quantforge.calibration import runner as runner_mod


def _param(device: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), numel=lambda: n, element_size=lambda: 4)


def _model(*params: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(parameters=lambda: iter(params))


def test_weights_already_on_the_device_count_as_fitting(monkeypatch):
    asked: list[int] = []
    monkeypatch.setattr(runner_mod, "_fits", lambda nbytes, device: asked.append(nbytes) or False)
    cuda = torch.device("cuda")
    on_gpu = _model(_param("cuda:0", 1000), _param("cuda:0", 24))
    assert runner_mod._fits_device(on_gpu, cuda)
    assert runner_mod._fits_device(on_gpu, torch.device("cuda:0"))
    assert asked == []
    # only the host part is weighed against the free memory
    assert not runner_mod._fits_device(_model(_param("cuda:0", 1000), _param("cpu", 24)), cuda)
    assert asked == [96]
    # a model on another GPU has to move, all of it
    assert not runner_mod._fits_device(on_gpu, torch.device("cuda:1"))
    assert asked == [96, 4096]
    assert runner_mod._fits_device(on_gpu, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_loaded_onto_the_gpu_is_resident(tmp_path, monkeypatch):
    """The model takes more than 0.6 x the memory left once it is loaded: the runner must still keep it there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    path = tmp_path / "llama"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    n = sum(p.numel() for p in runner_mod.load_model(path).parameters())
    model = runner_mod.load_model(path, device="cuda", n_params=n)
    assert next(model.parameters()).is_cuda
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(runner_mod, "_fits", lambda b, device: b < nbytes)
    r = runner_mod.DecoderRunner(model, device="cuda")
    assert r.resident
    with r.on_device(0) as layer:
        pass
    assert next(layer.parameters()).is_cuda
