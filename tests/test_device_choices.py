"""CPU tuning stays on CPU: the choices measured on CPU (docs/performance.md) are not applied on a CUDA machine.

CUDA is emulated by patching the availability checks the code reads; nothing here touches a GPU.
"""
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_grace.rollout import engine as rollout
from megatron_grace.models import output, rope


def test_eager_swiglu_while_decoding_only_without_cuda(monkeypatch):
    monkeypatch.setattr(rollout, "has_cuda", lambda: False)
    assert rollout.decode_overrides() == {"bias_activation_fusion": False}
    monkeypatch.setattr(rollout, "has_cuda", lambda: True)
    assert rollout.decode_overrides() == {}


def test_logit_chunks_are_sized_per_device():
    assert set(output.CHUNK_LOGIT_ELEMENTS) == {"cpu", "cuda"}
    assert output.CHUNK_LOGIT_ELEMENTS["cuda"] > output.CHUNK_LOGIT_ELEMENTS["cpu"]


def test_dynamo_recompile_limit_is_raised_only_without_cuda(monkeypatch):
    import torch._dynamo

    # dynamo's config module is restored by hand: monkeypatch's undo deletes the attribute there.
    saved = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        rope.install()
        assert torch._dynamo.config.recompile_limit == 8
        assert rope_utils.fused_apply_rotary_pos_emb is rope.apply_rotary_cached
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        rope.install()
        assert torch._dynamo.config.recompile_limit == 32
    finally:
        torch._dynamo.config.recompile_limit = saved


def test_rope_rotation_is_compiled_only_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(rope, "_rotate_compiled",
                        lambda t, cos, sin: calls.append("compiled") or rope.rotate(t, cos, sin))
    t = torch.randn(4, 1, 2, 8)
    freqs = torch.randn(4, 1, 1, 8)
    rope.apply_rotary_cached(t, freqs)
    assert calls == ["compiled"]

    class FakeCudaTensor(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    rope.apply_rotary_cached(t.as_subclass(FakeCudaTensor), freqs)
    assert calls == ["compiled"]
