"""What importing the packages costs and needs: no Triton and no transformers at import, every op on its
torch backend without Triton (and info saying why), and attn_implementation="triton" registered with
transformers whichever of the two is imported first. Each case runs in a fresh interpreter."""
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.getcwd(), **env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_loads_neither_triton_nor_transformers():
    out = _run("""
        import sys
        import unispeech, unispeech_kernels
        print(sorted(m for m in ("triton", "transformers") if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_without_triton_every_op_runs_its_torch_backend():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # not importable
        import torch
        import unispeech, unispeech_kernels
        from unispeech_kernels import info
        from unispeech_kernels.ops import registered_ops
        for op in registered_ops():
            inputs = op.example_inputs(torch.device("cpu"), torch.float32)
            assert op.select(inputs).name == "torch", op.name
            assert "triton not importable" in op.reasons(inputs)["triton"], op.reasons(inputs)
        q = torch.randn(1, 5, 2, 8)
        assert unispeech_kernels.attention(q, q, q).shape == q.shape
        config = unispeech.UniSpeechConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=37, conv_dim=(32, 32), conv_kernel=(10, 3),
                                           conv_stride=(5, 2), num_conv_pos_embeddings=5,
                                           num_conv_pos_embedding_groups=4)
        with torch.no_grad():
            unispeech.UniSpeechModel(config).eval()(torch.randn(2, 400))
        print(info.report())
        assert "triton" not in sys.modules or sys.modules["triton"] is None
    """, TRITON_INTERPRET="1")
    assert "triton             triton not importable" in out
    assert "    triton   triton not importable" in out


def test_without_transformers_the_packages_work():
    _run("""
        import sys
        sys.modules["transformers"] = None  # not importable
        import torch
        import unispeech, unispeech_kernels
        from unispeech_kernels.integrations import transformers as integration
        assert integration.register_transformers_attention() is False
        q = torch.randn(1, 5, 2, 8)
        assert unispeech_kernels.attention(q, q, q).shape == q.shape
    """)


REGISTERED = """
    import transformers
    from transformers.masking_utils import AttentionMaskInterface
    assert transformers.AttentionInterface._global_mapping["triton"].__module__ == \\
        "unispeech_kernels.integrations.transformers"
    assert "triton" in AttentionMaskInterface._global_mapping
"""


@pytest.mark.parametrize("order", [
    "import transformers.modeling_utils, transformers.masking_utils\nimport unispeech_kernels",
    "import transformers\nimport unispeech_kernels",  # transformers' interfaces not imported yet
    "import unispeech_kernels\nimport transformers",
    "import unispeech",  # the model layer imports unispeech_kernels, not transformers
], ids=["interfaces-first", "transformers-first", "ours-first", "model-layer"])
def test_triton_attention_registered_in_either_import_order(order):
    _run(order + "\n" + textwrap.dedent(REGISTERED))


def test_registered_model_loads_with_triton_attention():
    _run("""
        import unispeech_kernels
        import transformers
        config = transformers.UniSpeechConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2),
                                              conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                              num_conv_pos_embedding_groups=2, attn_implementation="triton")
        assert transformers.UniSpeechModel(config).config._attn_implementation == "triton"
    """, HF_HUB_OFFLINE="1")
