"""UniSpeechForPreTraining with the full objective: terms, gradients, training, DDP, config fields.

Tiny random-weight models with kernel_backend="torch" (the objective is what is under test here,
not the kernels), every dropout off unless a test says otherwise."""
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.tolerances import assert_close
from unispeech import UniSpeechConfig, UniSpeechForPreTraining
from unispeech.pretraining import contrastive_loss, sample_negative_indices

SAMPLES = 800  # -> 39 frames with the conv stack below
FRAMES = 39


def tiny_config(**overrides):
    fields = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_codevectors_per_group=8, num_codevector_groups=2,
        codevector_dim=16, proj_codevector_dim=16, num_negatives=5, num_ctc_classes=12,
        mask_time_length=2, mask_time_prob=0.3, hidden_dropout=0.0, activation_dropout=0.0,
        attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
        kernel_backend="torch",
    )
    fields.update(overrides)
    return UniSpeechConfig(**fields)


def batch(size=3):
    x = torch.randn(size, SAMPLES)
    attention = torch.ones(size, SAMPLES, dtype=torch.long)
    attention[1, 500:] = 0  # 24 real frames
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100], [6, 7, 8, 9], [3, 3, 1, -100]])[:size]
    return x, attention, labels


def test_all_four_terms_and_gradients_reach_every_part():
    model = UniSpeechForPreTraining(tiny_config()).train()
    x, attention, labels = batch()
    out = model(x, attention_mask=attention, labels=labels)
    terms = dict(loss=out.loss, contrastive=out.contrastive_loss, diversity=out.diversity_loss, ctc=out.ctc_loss)
    for name, value in terms.items():
        assert value is not None and value.dim() == 0 and torch.isfinite(value), name
    assert out.contrastive_loss > 0 and out.ctc_loss > 0 and 0 <= out.diversity_loss < 1
    out.loss.backward()
    parts = ["quantizer.codevectors", "quantizer.weight_proj.weight", "project_q.weight", "project_hid.weight",
             "ctc_proj.weight", "unispeech.encoder.layers.0.attention.q_proj.weight",
             "unispeech.encoder.layers.1.feed_forward.output_dense.weight",
             "unispeech.feature_extractor.conv_layers.0.conv.weight", "unispeech.masked_spec_embed"]
    params = dict(model.named_parameters())
    for name in parts:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"no gradient in {name}"


def test_loss_formula_unlabeled_batches_and_eval():
    cfg = tiny_config(pretraining_ctc_weight=0.3, diversity_loss_weight=0.2)
    model = UniSpeechForPreTraining(cfg).eval()
    x, attention, labels = batch()
    mask = torch.rand(3, FRAMES) < 0.4
    real = model._get_feature_vector_attention_mask(FRAMES, attention)
    negatives = sample_negative_indices(mask & real, cfg.num_negatives, real)
    with torch.no_grad():
        out = model(x, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives,
                    labels=labels)
        again = model(x, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives,
                      labels=labels)
        unlabeled = model(x, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives)
        no_mask = model(x, attention_mask=attention, labels=labels)
        nothing = model(x, attention_mask=attention)
    assert torch.equal(out.loss, again.loss), "eval with given masks and negatives must be deterministic"
    masked = (mask & real).sum()
    self_supervised = out.contrastive_loss + 0.2 * masked * out.diversity_loss
    torch.testing.assert_close(out.loss, 0.3 * out.ctc_loss + 0.7 * self_supervised)
    direct = contrastive_loss(out.projected_states, out.projected_quantized_states, mask & real, negatives, 0.1)
    torch.testing.assert_close(out.contrastive_loss, direct)
    assert unlabeled.ctc_loss is None
    torch.testing.assert_close(unlabeled.loss, self_supervised)
    assert no_mask.contrastive_loss is None and no_mask.diversity_loss is None
    torch.testing.assert_close(no_mask.loss, 0.3 * no_mask.ctc_loss)
    assert nothing.loss is None and nothing.ctc_loss is None
    assert nothing.to_tuple()[0] is nothing.projected_states  # tuples skip the missing loss


def test_configurable_blank_and_bad_inputs():
    model = UniSpeechForPreTraining(tiny_config(pretraining_ctc_blank_id=8)).train()
    x, attention, _ = batch(2)
    with_zero = torch.tensor([[0, 1, 2], [3, 0, -100]])  # 0 is a phoneme when the blank is 8
    assert torch.isfinite(model(x, attention_mask=attention, labels=with_zero).ctc_loss)
    with pytest.raises(ValueError, match="num_ctc_classes=12"):
        model(x, attention_mask=attention, labels=torch.tensor([[1, 12], [2, -100]]))
    with pytest.raises(ValueError, match="blank id 8"):
        model(x, attention_mask=attention, labels=torch.tensor([[1, 8], [2, -100]]))
    with pytest.raises(ValueError, match="mask_time_indices"):
        model(x, mask_time_indices=torch.ones(2, FRAMES + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="same utterance"):
        model(x, mask_time_indices=torch.ones(2, FRAMES, dtype=torch.bool),
              sampled_negative_indices=torch.full((2, FRAMES, 3), FRAMES + 1))
    with pytest.raises(ValueError, match="pretraining_ctc_weight"):
        tiny_config(pretraining_ctc_weight=1.5)
    with pytest.raises(ValueError, match="pretraining_ctc_blank_id"):
        tiny_config(pretraining_ctc_blank_id=12)


def test_config_fields_round_trip():
    cfg = tiny_config(pretraining_ctc_weight=0.25, pretraining_ctc_blank_id=76 - 70)
    again = UniSpeechConfig.from_dict(cfg.to_dict())
    assert again.pretraining_ctc_weight == 0.25 and again.pretraining_ctc_blank_id == 6
    default = UniSpeechConfig()
    assert default.pretraining_ctc_weight == 0.5 and default.pretraining_ctc_blank_id is None


def test_fifty_adam_steps_lower_the_loss(one_thread):
    torch.manual_seed(1)
    model = UniSpeechForPreTraining(tiny_config(mask_time_prob=0.4, replace_prob=0.5)).train()
    x, attention, labels = batch(3)
    x, attention = x[:, :400], attention[:, :400]  # 19 frames
    attention[1, 250:] = 0
    mask = torch.rand(3, 19) < 0.4
    real = model._get_feature_vector_attention_mask(19, attention)
    negatives = sample_negative_indices(mask & real, model.config.num_negatives, real)
    fixed = dict(attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives,
                 labels=labels)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = model(x, **fixed).loss.item()
        model.train()
        return loss

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        optimizer.zero_grad()
        model(x, **fixed).loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.6 * before, f"50 Adam steps: loss {before:.2f} -> {after:.2f}"


def _shard_negatives(negatives, start, stop):
    """Flat indices b*T + t of the whole batch -> those of the shard [start, stop)."""
    return negatives[start:stop] - start * FRAMES


def _ddp_worker(rank, world, tmp):
    """One DDP rank. Everything travels through files in ``tmp`` (no tensors pickled through
    torch.multiprocessing's file-descriptor sharing, which was seen to stall a rank)."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: another interface refused gloo's connections
    state, inputs = torch.load(os.path.join(tmp, "inputs.pt"))
    store_path, out_path = os.path.join(tmp, "store"), os.path.join(tmp, "grads.pt")
    # a file store (no TCP port to race for) and a collective timeout: a stuck rank fails, never hangs
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=180))
    try:
        model = UniSpeechForPreTraining(tiny_config(replace_prob=0.0))
        model.load_state_dict(state)
        model.train()
        model.quantizer.eval()  # argmax codes: no Gumbel noise, so both runs see the same codes
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per_rank = inputs["x"].shape[0] // world
        start, stop = rank * per_rank, (rank + 1) * per_rank
        out = ddp(inputs["x"][start:stop], attention_mask=inputs["attention"][start:stop],
                  mask_time_indices=inputs["mask"][start:stop], labels=inputs["labels"][start:stop],
                  sampled_negative_indices=_shard_negatives(inputs["negatives"], start, stop))
        out.loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_path)
    finally:
        torch.distributed.destroy_process_group()


def _spawn_ranks(world, tmp):
    torch.multiprocessing.spawn(_ddp_worker, args=(world, tmp), nprocs=world, join=True)


def _run_ranks(code, tmp, root, timeout):
    """Run the ranks' launcher in its own session; (returncode, stderr), returncode None on timeout.
    The whole session is killed afterwards (spawned ranks outlive a killed launcher) and the file
    store removed, so a stalled attempt leaves nothing for the next one to rendezvous with."""
    proc = subprocess.Popen([sys.executable, "-c", code, tmp], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode, stderr = None, ""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
    store = os.path.join(tmp, "store")
    if os.path.exists(store):
        os.remove(store)
    return returncode, stderr


def _gloo_transport_failure(stderr: str) -> bool:
    """A rank died of gloo's transport (a send/recv timeout, a refused or reset connection): the
    same stall as a hung rank, not an error of the code under test."""
    return re.search(r"gloo.*(Timed out waiting|Connection (refused|reset|closed))", stderr) is not None


def test_ddp_step_matches_one_process_on_the_whole_batch():
    """DDP averages gradients over ranks and every term of our loss is a sum over the local shard
    (the diversity term uses the all-reduced code distribution), so world_size x the DDP gradient
    equals the single-process gradient of the whole batch."""
    world = 2
    model = UniSpeechForPreTraining(tiny_config(replace_prob=0.0))
    x, attention, labels = batch(4)
    attention[3, 650:] = 0
    mask = torch.rand(4, FRAMES) < 0.4
    real = model._get_feature_vector_attention_mask(FRAMES, attention)
    negatives = sample_negative_indices(mask & real, model.config.num_negatives, real)
    inputs = dict(x=x, attention=attention, mask=mask, labels=labels, negatives=negatives)

    model.train()
    model.quantizer.eval()
    model(x, attention_mask=attention, mask_time_indices=mask, labels=labels,
          sampled_negative_indices=negatives).loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "grads.pt")
        torch.save((model.state_dict(), inputs), os.path.join(tmp, "inputs.pt"))
        # the ranks are spawned from a fresh interpreter: spawned from this pytest process (after
        # other test files ran in it) a rank was seen to stall now and then
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = "import sys; from tests.test_pretraining_model import _spawn_ranks; _spawn_ranks(2, sys.argv[1])"
        # a gloo rank on a 2-core sandbox was seen to stall now and then; the timeouts leave a loaded
        # machine several times its need (a run took ~90 s with six other jobs on the two cores)
        for attempt in range(2):
            returncode, stderr = _run_ranks(code, tmp, root, timeout=300)
            if returncode is not None and not _gloo_transport_failure(stderr):
                break  # ran (a stall is a timeout, or a transport error the ranks' own 180 s timeout raised)
        else:
            pytest.skip("DDP ranks stalled twice (gloo on this machine), not a gradient mismatch")
        assert returncode == 0, stderr[-3000:]
        ddp_grads = torch.load(out_path)
    assert set(ddp_grads) == set(expected)
    for name, grad in expected.items():
        assert_close(world * ddp_grads[name], grad, name=name)
