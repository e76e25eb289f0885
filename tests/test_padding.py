"""unispeech_kernels.padding (lengths <-> masks <-> packed rows) and what the model does with it: the
frame lengths are read once per forward, so a padded batch's forward makes one host sync at most
(counted on the CPU by the tensor methods that sync; on a GPU by torch's sync debug mode)."""
import warnings

import pytest
import torch

import unispeech
from unispeech_kernels.padding import (conv_output_length, mask_from_lengths, pack, pack_index, prefix_lengths,
                                       receptive_field, sequence_starts, unpack)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11)


def test_lengths_masks_and_packed_rows():
    lengths = [3, 0, 5]
    mask = mask_from_lengths(torch.tensor(lengths), 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [0] * 5, [1] * 5]
    assert prefix_lengths(mask) == lengths
    holey = mask.clone()
    holey[2, 1] = False
    assert prefix_lengths(holey) is None
    index = pack_index(lengths, 5, torch.device("cpu"))
    assert torch.equal(index, mask.reshape(-1).nonzero().squeeze(1))
    x = torch.randn(3, 5, 2)
    rows = pack(x, index)
    assert torch.equal(rows, x[mask])
    back = unpack(rows, index, 3, 5)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    assert pack(x, None).shape == (15, 2) and unpack(pack(x, None), None, 3, 5).shape == x.shape
    assert sequence_starts(lengths) == [0, 3, 3] and pack_index([], 5, torch.device("cpu")).numel() == 0


def test_conv_output_length_and_receptive_field():
    kernels, strides = (10, 3, 3), (5, 2, 2)
    field = receptive_field(kernels, strides)
    assert field == 40 and conv_output_length(field, kernels, strides) == 1
    assert conv_output_length(field - 1, kernels, strides) < 1
    lengths = torch.tensor([900, field, 123])
    assert conv_output_length(lengths, kernels, strides).tolist() == \
        [conv_output_length(n, kernels, strides) for n in lengths.tolist()]


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("cls", [unispeech.UniSpeechModel, unispeech.UniSpeechForCTC])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_one_host_sync_per_padded_forward(monkeypatch, cls, norm):
    model = cls(unispeech.UniSpeechConfig(**TINY, feat_extract_norm=norm)).eval()
    x = torch.randn(3, 900)
    mask = torch.ones(3, 900, dtype=torch.long)
    mask[1, 500:] = 0
    mask[2, 200:] = 0
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        model(x, attention_mask=mask)
    monkeypatch.undo()
    assert calls == ["tolist"], calls


@pytest.mark.gpu
def test_one_host_sync_per_padded_forward_on_gpu():
    model = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY)).to(DEVICE).eval()
    x = torch.randn(3, 900, device=DEVICE)
    mask = torch.ones(3, 900, dtype=torch.long, device=DEVICE)
    mask[1, 500:] = 0
    with torch.no_grad():
        model(x, attention_mask=mask)  # warm: caches, autotuning
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                model(x, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
