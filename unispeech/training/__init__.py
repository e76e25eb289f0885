"""What both training recipes (``unispeech.pretrain``, ``unispeech.finetune``) share.

audio        decode (soundfile) and resample (soxr) to the model's rate
data         manifests / folders -> checked utterances, their dataset and collate function
sampler      length-bucketed, distributed, resumable batch order; evaluation shards
distributed  torchrun set-up (NCCL / gloo), DDP or FSDP2 wrapping, gradient sync, reductions
checkpoint   save / resume: weights, optimizer, scheduler, step, RNG states
schedule     the tri-stage learning-rate schedule
metrics      greedy CTC decoding, edit distance, CER / WER
loop         the training loop: accumulation, autocast, loss normalisation, logging, saving
cli          the command-line flags both recipes take
"""
