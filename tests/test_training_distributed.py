"""The recipes across processes (gloo on the CPU): a 2-process step equals one process on the
whole batch (DDP and FSDP2), torchrun runs with LayerDrop under DDP, and resuming continues
exactly.

Machine independence: every process group is gloo on the loopback interface
(GLOO_SOCKET_IFNAME=lo, MASTER_ADDR=127.0.0.1, a port the OS picked free; torchrun --standalone
picks its own), one thread per process, and a timeout on every launch (a stalled rank fails the
test with its output instead of hanging it). Nothing depends on timing or the thread count."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from tests.tolerances import assert_close
from unispeech import UniSpeechConfig, UniSpeechForPreTraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900  # only a hang reaches it: a loaded 2-core machine has taken 240 s for one launch


def tiny_config(**overrides):
    fields = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        num_codevectors_per_group=8, num_codevector_groups=2, codevector_dim=16, proj_codevector_dim=16,
        num_negatives=5, mask_time_length=2, mask_time_prob=0.3, hidden_dropout=0.0, activation_dropout=0.0,
        attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, replace_prob=0.0,
        kernel_backend="torch", batch_invariant_group_norm=True)  # features independent of the padding
    fields.update(overrides)
    return UniSpeechConfig(**fields)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 utterances of 0.05-0.1 s (tones + noise) with transcripts and phonemes, a tiny config and a
    tiny pre-trained checkpoint to fine-tune."""
    folder = tmp_path_factory.mktemp("training")
    rng = np.random.default_rng(0)
    words = ["ab", "ba", "abb", "b", "aab"]
    with open(folder / "train.jsonl", "w") as f:
        for i in range(8):
            n = int(rng.integers(800, 1600))
            tone = np.sin(2 * np.pi * rng.uniform(200, 900) * np.arange(n) / 16000)
            audio = 0.3 * tone + 0.05 * rng.standard_normal(n)
            soundfile.write(str(folder / f"{i}.wav"), audio, 16000, subtype="PCM_16")
            text = " ".join(rng.choice(words, 2))
            f.write(json.dumps(dict(audio=f"{i}.wav", text=text, phonemes=" ".join(text.replace(" ", "")))) + "\n")
    tiny_config().save_pretrained(str(folder / "config"))
    torch.manual_seed(0)
    UniSpeechForPreTraining(tiny_config(num_ctc_classes=3)).save_pretrained(str(folder / "pretrained"))
    return folder


def recipe_argv(recipe, folder, out, *extra):
    common = ["--output-dir", str(out), "--device", "cpu", "--log-every", "1", "--freeze-feature-encoder-steps", "0",
              "--warmup", "0.5"]
    if recipe == "finetune":
        model = ["--checkpoint", str(folder / "pretrained")]
    else:
        model = ["--config", str(folder / "config"), "--lr", "1e-3"]
    return model + ["--train", str(folder / "train.jsonl")] + common + list(extra)


def _launch(commands, envs, timeout=TIMEOUT):
    """Run the processes to the end; their combined output; fails on a timeout or an error."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c, e in zip(commands, envs)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a training process ran past {timeout} s (stalled rank?)")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = "\n".join(outputs)
    assert all(p.returncode == 0 for p in procs), text[-4000:]
    return text


def _env(**extra):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noiseless_gumbel(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """Straight-through argmax: the Gumbel noise is drawn per rank in the shape of the local batch,
    so no 2-process run can reproduce a 1-process draw; both runs go without it."""
    soft = (logits / tau).softmax(dim)
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def gradient_worker(recipe, argv_json, out_path):
    """One rank: the recipe's first optimizer step's loss and gradients (gathered whole)."""
    from unispeech import finetune, pretrain
    from unispeech.training.distributed import init_runtime, shutdown
    from unispeech.training.loop import Trainer

    torch.nn.functional.gumbel_softmax = _noiseless_gumbel
    module = finetune if recipe == "finetune" else pretrain
    args = module.parse_args(json.loads(argv_json))
    runtime = init_runtime("cpu", timeout_s=600)
    trainer = Trainer(args, runtime, *module.build(args, runtime))
    sums = trainer.gradient_step(1)
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in trainer.model.named_parameters() if p.grad is not None}
    if runtime.main:
        torch.save(dict(sums=sums, grads=grads), out_path)
    shutdown(runtime)


_REFERENCE = {}  # recipe -> the one-process result (computed once)


def _gradients(recipe, data, tmp_path, name, world, batch, *extra):
    out = tmp_path / f"{name}.pt"
    argv = recipe_argv(recipe, data, tmp_path / name, "--batch-size", str(batch), *extra)
    code = ("import sys; from tests.test_training_distributed import gradient_worker; "
            "gradient_worker(sys.argv[1], sys.argv[2], sys.argv[3])")
    port = _free_port()
    envs = [_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(world)]
    _launch([[sys.executable, "-c", code, recipe, json.dumps(argv), str(out)]] * world, envs)
    return torch.load(out)


@pytest.mark.parametrize("recipe, mode", [("finetune", "ddp"), ("finetune", "fsdp"), ("pretrain", "ddp")])
def test_two_processes_equal_one_process_on_the_whole_batch(recipe, mode, data, tmp_path):
    """Same global batch (4 utterances: the sampler's order does not depend on the world size),
    split 2 + 2 over gloo ranks, vs one process: the per-sample loss and every gradient agree.
    Fine-tuning without SpecAugment (drawn per rank); pre-training with the recipe's masks and
    negatives (drawn per utterance, so the same in both runs)."""
    extra = ["--set", "mask_time_prob=0.0"] if recipe == "finetune" else []
    if recipe not in _REFERENCE:
        _REFERENCE[recipe] = _gradients(recipe, data, tmp_path, "one", 1, 4, *extra)
    one = _REFERENCE[recipe]
    two = _gradients(recipe, data, tmp_path, "two", 2, 2, *extra, *(["--fsdp"] if mode == "fsdp" else []))
    assert set(one["sums"]) == set(two["sums"]) and one["sums"]["utterances"][0] == two["sums"]["utterances"][0] == 4
    for key, (total, count) in one["sums"].items():
        if key == "utterances":
            continue
        assert count == two["sums"][key][1], key
        assert_close(torch.tensor(two["sums"][key][0] / count), torch.tensor(total / count), name=key)
    assert set(one["grads"]) == set(two["grads"]) and len(one["grads"]) > 20
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0, f"{name}: no gradient reached it"
        assert_close(two["grads"][name], grad, name=name)


def _losses(folder):
    with open(folder / "log.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _torchrun(module, argv, nodes=1):
    """``torchrun --standalone --nproc_per_node=2 -m module argv`` (the README's one-node command),
    or with nodes=2 the README's two-node command with one process per "node", both on this machine."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return _launch([torchrun + ["--standalone", "--nproc_per_node=2", "-m", module] + argv], [_env()])
    endpoint = f"127.0.0.1:{_free_port()}"
    command = torchrun + ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                          "--rdzv_id=test", "-m", module] + argv
    return _launch([command, command], [_env(), _env()])


def test_torchrun_finetune_with_layerdrop_resumes_exactly(data, tmp_path):
    """torchrun, 2 gloo processes, LayerDrop 0.5 and dropout and SpecAugment on, DDP without
    find_unused_parameters, the feature encoder frozen for steps 1-2: 4 steps with a checkpoint at
    step 2; resumed from it, steps 3 and 4 give the same losses."""
    from unispeech.training.loop import derived_seed
    drops = [[bool(torch.rand([], generator=g) < 0.5) for _ in range(2)]
             for g in (torch.Generator().manual_seed(derived_seed(0, s, 0, 1)) for s in range(1, 5))]
    assert any(any(d) for d in drops), "the seeded LayerDrop draws should skip a layer in 4 steps"
    extra = ["--steps", "4", "--batch-size", "2", "--save-every", "2", "--set", "layerdrop=0.5", "hidden_dropout=0.1",
             "mask_time_prob=0.2", "--freeze-feature-encoder-steps", "2"]  # DDP rebuilt at the unfreeze
    _torchrun("unispeech.finetune", recipe_argv("finetune", data, tmp_path / "full", *extra))
    _torchrun("unispeech.finetune", recipe_argv("finetune", data, tmp_path / "resumed", *extra, "--resume",
                                                str(tmp_path / "full" / "checkpoint-2")))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert_close(torch.tensor(resumed[step]), torch.tensor(full[step]), name=f"loss at step {step}")
    for name in ("model.safetensors", "preprocessor_config.json", "vocab.json", "tokenizer_config.json",
                 "special_tokens_map.json", "optimizer.pt", "trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt"):
        assert (tmp_path / "full" / "checkpoint-2" / name).is_file(), name


def test_torchrun_pretrain_on_two_nodes_resumes_exactly(data, tmp_path):
    """torchrun as on two nodes (c10d rendezvous, one process each), the full objective with Gumbel
    noise; resumed from step 2 (``--resume latest``) as on one node: steps 3 and 4 give the same
    losses."""
    extra = ["--steps", "4", "--batch-size", "2", "--save-every", "2"]
    _torchrun("unispeech.pretrain", recipe_argv("pretrain", data, tmp_path / "full", *extra), nodes=2)
    os.makedirs(tmp_path / "resumed")
    os.rename(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _torchrun("unispeech.pretrain", recipe_argv("pretrain", data, tmp_path / "resumed", *extra, "--resume", "latest"))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert_close(torch.tensor(resumed[step]), torch.tensor(full[step]), name=f"loss at step {step}")
    assert UniSpeechForPreTraining.from_pretrained(str(tmp_path / "resumed")).config.num_ctc_classes == 3
