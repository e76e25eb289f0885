"""Task heads on UniSpeechModel: CTC, sequence classification and pre-training (with the full
UniSpeech objective of unispeech.pretraining, where transformers returns loss=None).

Shapes: logits [B, T, vocab_size] (CTC), [B, num_labels] (classification); projected states
[B, T, hidden] and projected quantized states [B, T, hidden] (pre-training).
"""
from __future__ import annotations

import torch
from torch import nn

from .modeling import UniSpeechModel, UniSpeechPreTrainedModel
from .outputs import CausalLMOutput, SequenceClassifierOutput
from .pretraining import UniSpeechForPreTrainingOutput, pretraining_losses, pretraining_mask
from .quantizer import UniSpeechGumbelVectorQuantizer


class _HeadBase(UniSpeechPreTrainedModel):
    def __init__(self, config, attn_implementation=None, kernel_backend=None):
        super().__init__(config, attn_implementation, kernel_backend)
        self.unispeech = UniSpeechModel(self.config)

    def freeze_feature_encoder(self):
        """Stop gradients to (and updates of) the conv feature encoder."""
        self.unispeech.feature_extractor._freeze_parameters()

    def _flags(self, output_attentions, output_hidden_states, return_dict):
        cfg = self.config
        return (cfg.output_attentions if output_attentions is None else output_attentions,
                cfg.output_hidden_states if output_hidden_states is None else output_hidden_states,
                cfg.return_dict if return_dict is None else return_dict)


class UniSpeechForCTC(_HeadBase):
    def __init__(self, config, attn_implementation=None, kernel_backend=None):
        super().__init__(config, attn_implementation, kernel_backend)
        if self.config.vocab_size is None:
            raise ValueError("UniSpeechForCTC needs config.vocab_size (the size of the CTC vocabulary)")
        self.dropout = nn.Dropout(self.config.final_dropout)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size)
        self.post_init()

    def freeze_base_model(self):
        """Train only the head."""
        for p in self.unispeech.parameters():
            p.requires_grad = False

    def ctc_loss(self, logits, labels, attention_mask, input_values):
        """transformers' CTC loss: -100 and pad_token_id labels ignored, blank = pad_token_id, float32
        log-softmax, reduction and zero_infinity from the config."""
        cfg = self.config
        samples = attention_mask.sum(-1) if attention_mask is not None else torch.full(
            (input_values.shape[0],), input_values.shape[1], device=input_values.device, dtype=torch.long)
        logit_lengths = self._get_feat_extract_output_lengths(samples).to(torch.long)
        labels = labels.to(logits.device)
        keep = (labels != -100) & (labels != cfg.pad_token_id)
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(log_probs, labels.masked_select(keep), logit_lengths, keep.sum(-1),
                                          blank=cfg.pad_token_id, reduction=cfg.ctc_loss_reduction,
                                          zero_infinity=cfg.ctc_zero_infinity)

    def forward(self, input_values, attention_mask=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, mask_time_indices=None):
        """mask_time_indices [B, T]: frames replaced by masked_spec_embed (as in UniSpeechModel)."""
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict)
        if labels is not None and labels.numel() and labels.max() >= self.config.vocab_size:
            raise ValueError(f"Label values must be < vocab_size ({self.config.vocab_size}), got "
                             f"{int(labels.max())}")
        out = self.unispeech(input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=True)
        logits = self.lm_head(self.dropout(out.last_hidden_state))
        loss = None if labels is None else self.ctc_loss(logits, labels, attention_mask, input_values)
        result = CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                attentions=out.attentions)
        return result if return_dict else result.to_tuple()


class UniSpeechForSequenceClassification(_HeadBase):
    def __init__(self, config, attn_implementation=None, kernel_backend=None):
        super().__init__(config, attn_implementation, kernel_backend)
        cfg = self.config
        if cfg.use_weighted_layer_sum:
            n = cfg.num_hidden_layers + 1  # transformer layers + their input
            self.layer_weights = nn.Parameter(torch.ones(n) / n)
            self.unispeech.encoder.record_skipped_layers = True  # LayerDrop keeps n hidden states
        self.projector = nn.Linear(cfg.hidden_size, cfg.classifier_proj_size)
        self.classifier = nn.Linear(cfg.classifier_proj_size, cfg.num_labels)
        self.post_init()
        if cfg.use_weighted_layer_sum:
            nn.init.constant_(self.layer_weights, 1.0 / (cfg.num_hidden_layers + 1))

    def freeze_base_model(self):
        """Train only the head."""
        for p in self.unispeech.parameters():
            p.requires_grad = False

    def forward(self, input_values, attention_mask=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, mask_time_indices=None):
        """mask_time_indices [B, T]: frames replaced by masked_spec_embed (as in UniSpeechModel)."""
        cfg = self.config
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict)
        out = self.unispeech(input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                             output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states or cfg.use_weighted_layer_sum,
                             return_dict=True)
        if cfg.use_weighted_layer_sum:
            stacked = torch.stack(out.hidden_states, dim=1)  # [B, N + 1, T, E]
            weights = nn.functional.softmax(self.layer_weights, dim=-1)
            hidden = (stacked * weights.view(-1, 1, 1)).sum(dim=1)
        else:
            hidden = out.last_hidden_state
        hidden = self.projector(hidden)
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:  # mean over real frames only
            frames = self._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
            if not torch.compiler.is_compiling() and not frames.any(1).all():
                raise ValueError(f"attention_mask leaves utterance(s) {(~frames.any(1)).nonzero()[:, 0].tolist()} "
                                 "no real frame: there is nothing to classify (at least "
                                 f"{self.unispeech.feature_extractor.receptive_field} real samples are needed)")
            pooled = hidden.masked_fill(~frames[:, :, None], 0.0).sum(dim=1) / frames.sum(dim=1).view(-1, 1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            check_class_labels(labels, cfg.num_labels, logits.shape[0])
            loss = nn.functional.cross_entropy(logits.view(-1, cfg.num_labels), labels.view(-1))
        result = SequenceClassifierOutput(loss=loss, logits=logits,
                                          hidden_states=out.hidden_states if output_hidden_states else None,
                                          attentions=out.attentions)
        return result if return_dict else result.to_tuple()


def check_class_labels(labels, num_labels: int, batch: int):
    """labels [B] integer class ids in [0, num_labels) (-100: ignored, as cross_entropy's default)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be a tensor of integer class ids, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.numel() != batch:
        raise ValueError(f"labels must hold one class id per utterance ({batch}), got shape {tuple(labels.shape)}")
    bad = (labels != -100) & ((labels < 0) | (labels >= num_labels))
    if bad.any():
        raise ValueError(f"labels must be class ids in [0, num_labels={num_labels}) or -100, got "
                         f"{labels[bad].tolist()}")


class UniSpeechForPreTraining(_HeadBase):
    def __init__(self, config, attn_implementation=None, kernel_backend=None):
        super().__init__(config, attn_implementation, kernel_backend)
        cfg = self.config
        self.dropout_features = nn.Dropout(cfg.feat_quantizer_dropout)
        self.quantizer = UniSpeechGumbelVectorQuantizer(cfg)
        self.project_q = nn.Linear(cfg.codevector_dim, cfg.proj_codevector_dim)
        self.project_hid = nn.Linear(cfg.proj_codevector_dim, cfg.hidden_size)
        self.ctc_proj = nn.Linear(cfg.hidden_size, cfg.num_ctc_classes)
        self.dropout = nn.Dropout(cfg.final_dropout)
        self.post_init()
        # codevector_perplexity is transformers': over every frame, padded ones included, so the
        # features of padded frames are computed here rather than skipped
        self.unispeech.feature_extractor.trim_padding = False

    def set_gumbel_temperature(self, temperature):
        """Gumbel-softmax temperature of the quantizer (decayed during training)."""
        self.quantizer.temperature = temperature

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, sampled_negative_indices=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        """mask_time_indices [B, T] (None: drawn in training), sampled_negative_indices [B, T, K] flat
        (None: drawn), labels [B, L] phoneme ids padded with -100 (None: no CTC term)."""
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict)
        mask_time_indices = pretraining_mask(self, input_values, attention_mask, mask_time_indices)
        out = self.unispeech(input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=True)
        extract_features = self.dropout_features(out.extract_features)
        quantized, perplexity = self.quantizer(extract_features)
        quantized = self.project_hid(self.project_q(quantized.to(self.project_q.weight.dtype)))
        losses = pretraining_losses(self, input_values, attention_mask, out.last_hidden_state, extract_features,
                                    quantized, mask_time_indices, sampled_negative_indices, labels)
        result = UniSpeechForPreTrainingOutput(loss=losses.loss, projected_states=out.last_hidden_state,
                                               projected_quantized_states=quantized,
                                               codevector_perplexity=perplexity,
                                               hidden_states=out.hidden_states, attentions=out.attentions,
                                               contrastive_loss=losses.contrastive_loss,
                                               diversity_loss=losses.diversity_loss, ctc_loss=losses.ctc_loss)
        return result if return_dict else result.to_tuple()
