"""Proof that the recipes learn speech: ``make learn`` (``python -m bench.learning.run``).

1. an espeak-ng corpus (bench.learning.corpus): training sentences by six voices, held-out
   sentences by a seventh voice;
2. (a) ``unispeech.pretrain`` of a small UniSpeech with the full objective (contrastive + diversity
   + phonetic CTC on espeak's IPA phonemes);
3. for each seed: (b) ``unispeech.finetune`` of character CTC from (a); (c) the same architecture
   from random weights, same recipe and steps; (d) transformers' UniSpeechForCTC loaded from (a),
   same recipe;
4. CER / WER of the held-out voice's held-out sentences, loss curves (PNG), wall times, written
   to bench/results/learning/learning_<date>.{json,md,png}.
Every step is the recipe's command line, printed before it runs. ``--size gpu`` is the larger
configuration for a GPU machine (more sentences, a wider and deeper model, more steps).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from unispeech import UniSpeechConfig

SIZES = {
    # 2 shared CPU cores, ~30 min: 5 convs (stride 320), 3 x 96 transformer
    "cpu": dict(train_sentences=200, voices=2, heldout=40, hidden=96, layers=3, heads=4, conv_dim=(32, 64, 64, 64, 64),
                conv_stride=(5, 4, 4, 2, 2), conv_kernel=(10, 8, 4, 4, 4), pretrain_steps=2000, finetune_steps=300,
                batch=4, processes=2, device="cpu"),
    # one GPU, well under an hour: the standard 7-conv encoder, 6 x 256 transformer, 4x the data
    "gpu": dict(train_sentences=800, voices=3, heldout=80, hidden=256, layers=6, heads=4, conv_dim=(256,) * 7,
                conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), pretrain_steps=3000,
                finetune_steps=2000, batch=16, processes=1, device="cuda"),
}
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results", "learning")


def model_config(size: dict) -> UniSpeechConfig:
    return UniSpeechConfig(
        hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        intermediate_size=4 * size["hidden"], conv_dim=size["conv_dim"], conv_stride=size["conv_stride"],
        conv_kernel=size["conv_kernel"], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_codevectors_per_group=32, num_codevector_groups=2, codevector_dim=64, proj_codevector_dim=64,
        num_negatives=20, mask_time_prob=0.3, mask_time_length=4, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, pad_token_id=0)


def start(command, log_file):
    """Start a recipe command line, its output to log_file. One thread per process: on a shared
    2-core machine a second thread waits on a busy core (a training step of the CPU size took 10x
    longer with 2 threads than with 1 at load 10)."""
    print("$ " + " ".join(command), flush=True)
    with open(log_file, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait(processes, log_files, started):
    """Wait for every process; the wall time of each (seconds since ``started``)."""
    walls = []
    for p, log_file in zip(processes, log_files):
        if p.wait():
            sys.exit(f"failed ({p.returncode}): see {log_file}")
        walls.append(time.time() - started)
    return walls


def run(command, log_file):
    started = time.time()
    return wait([start(command, log_file)], [log_file], started)[0]


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pre = [r for r in results["pretrain"]["log"] if "loss" in r]
    axes[0].plot([r["step"] for r in pre], [r["loss"] for r in pre], label="total / masked frame")
    axes[0].plot([r["step"] for r in pre], [r["contrastive"] for r in pre], label="contrastive / masked frame")
    axes[0].plot([r["step"] for r in pre], [r["ctc"] / 50 for r in pre], label="phonetic CTC / utterance / 50")
    axes[0].set(title="(a) pre-training", xlabel="step")
    styles = {"b": "C0", "c": "C1", "d": "C2"}
    for run_ in results["finetune"]:
        train_log = [r for r in run_["log"] if "loss" in r]
        evals = [r for r in run_["log"] if "eval_cer" in r]
        label = f"({run_['variant']}) seed {run_['seed']}"
        dash = "-" if run_["seed"] == results["seeds"][0] else "--"
        color = styles[run_["variant"]]
        axes[1].plot([r["step"] for r in train_log], [r["loss"] for r in train_log], dash, color=color,
                     label=label)
        axes[2].plot([r["step"] for r in evals], [r["eval_cer"] for r in evals], dash + "o", color=color,
                     label=label, markersize=3)
    axes[1].set(title="fine-tuning: CTC loss / character", xlabel="step", yscale="log")
    axes[2].set(title="held-out voice: CER", xlabel="step", ylim=(0, 1.05))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("(b) from pre-trained, (c) from random weights, (d) transformers' UniSpeechForCTC from pre-trained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


NAMES = {"b": "ours, from (a)", "c": "ours, random init", "d": "transformers, from (a)"}


def markdown(results):
    lines = [f"# Does it learn speech? espeak-ng corpus, {results['date']}", "",
             f"Machine: {results['machine']}. Wall time {results['wall_s'] / 60:.1f} min in all "
             f"(corpus {results['corpus_s']:.0f} s, pre-training {results['pretrain']['wall_s']:.0f} s on "
             f"{results['pretrain']['processes']} processes; the three fine-tunings of a seed side by side, one "
             "process each).",
             f"Corpus: {json.dumps(results['corpus'])}", "",
             "| run | seed | held-out CER | held-out WER | final train loss / char | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in results["finetune"]:
        lines.append(f"| ({r['variant']}) {NAMES[r['variant']]} | {r['seed']} | {r['cer']:.3f} | {r['wer']:.3f} | "
                     f"{r['train_loss']:.3f} | {r['wall_s']:.0f} |")
    lines += ["", "Per variant over the seeds (the seed-to-seed spread is the run-to-run noise):", ""]
    for variant in NAMES:
        cers = [r["cer"] for r in results["finetune"] if r["variant"] == variant]
        wers = [r["wer"] for r in results["finetune"] if r["variant"] == variant]
        lines.append(f"- ({variant}) {NAMES[variant]}: CER mean {sum(cers) / len(cers):.3f} (spread "
                     f"{max(cers) - min(cers):.3f}), WER mean {sum(wers) / len(wers):.3f}")
    lines += ["", "Commands (in order):", "```"] + results["commands"] + ["```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=sorted(SIZES), help="cpu: the 2-core run; gpu: larger")
    p.add_argument("--work", default="out/learning", help="corpus, checkpoints and logs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    p.add_argument("--results", default=RESULTS, help="where the json / md / png go")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    os.makedirs(args.work, exist_ok=True)
    started = time.time()
    py = [sys.executable, "-m"]
    corpus = os.path.join(args.work, "corpus")
    command = py + ["bench.learning.corpus", corpus, "--train-sentences", str(size["train_sentences"]),
                    "--voices-per-sentence", str(size["voices"]), "--heldout-sentences", str(size["heldout"])]
    corpus_s = run(command, os.path.join(args.work, "corpus.log"))
    commands = [" ".join(command[1:])]
    with open(os.path.join(args.work, "corpus.log")) as f:
        summary = json.loads(f.read().strip().splitlines()[-1])
    config_dir = os.path.join(args.work, "config")
    model_config(size).save_pretrained(config_dir)
    common = ["--device", size["device"], "--log-every", "10"]
    pre_dir = os.path.join(args.work, "a_pretrain")
    launcher = py if size["processes"] == 1 else py + ["torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={size['processes']}", "-m"]
    command = launcher + ["unispeech.pretrain", "--train", os.path.join(corpus, "train.jsonl"), "--config", config_dir,
                    "--steps", str(size["pretrain_steps"]), "--lr", "1e-3", "--warmup", "0.05", "--hold", "0.5",
                    "--gumbel-decay", str(round(0.25 ** (1 / size["pretrain_steps"]), 6)),
                    "--output-dir", pre_dir, "--batch-size", str(size["batch"] // size["processes"])] + common
    results = dict(date=datetime.date.today().isoformat(), size=args.size, seeds=args.seeds, corpus=summary,
                   corpus_s=corpus_s, machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   f"(load average at start {os.getloadavg()[0]:.1f})")
    results["pretrain"] = dict(wall_s=run(command, pre_dir + ".log"), log=read_log(pre_dir),
                               processes=size["processes"])
    commands.append(" ".join(command[1:]))
    results["finetune"] = []
    variants = (("b", []), ("c", ["--from-scratch"]), ("d", ["--implementation", "transformers"]))
    for seed in args.seeds:  # the three variants of a seed run side by side, one process each
        outs = [os.path.join(args.work, f"{variant}_seed{seed}") for variant, _ in variants]
        seed_started, processes = time.time(), []
        for (variant, extra), out in zip(variants, outs):
            command = py + ["unispeech.finetune", "--checkpoint", pre_dir,
                            "--train", os.path.join(corpus, "train.jsonl"),
                            "--eval", os.path.join(corpus, "heldout.jsonl"), "--steps", str(size["finetune_steps"]),
                            "--lr", "5e-4", "--freeze-feature-encoder-steps", str(size["finetune_steps"] // 5),
                            "--eval-every", str(size["finetune_steps"] // 5), "--seed", str(seed),
                            "--set", "mask_time_prob=0.1", "--output-dir", out,
                            "--batch-size", str(size["batch"])] + common + extra
            processes.append(start(command, out + ".log"))
            commands.append(" ".join(command[1:]))
        walls = wait(processes, [o + ".log" for o in outs], seed_started)
        for (variant, _), out, wall in zip(variants, outs, walls):
            log = read_log(out)
            last_eval = [r for r in log if "eval_cer" in r][-1]
            results["finetune"].append(dict(variant=variant, seed=seed, wall_s=wall, cer=last_eval["eval_cer"],
                                            wer=last_eval["eval_wer"], eval_loss=last_eval["eval_loss"],
                                            train_loss=[r for r in log if "loss" in r][-1]["loss"], log=log))
    results["commands"] = commands
    results["wall_s"] = time.time() - started
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"learning_{results['date']}" + ("" if args.size == "cpu" else f"_{args.size}"))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, stem + ".png")
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
