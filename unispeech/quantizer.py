"""Gumbel-softmax product vector quantizer of UniSpeechForPreTraining.

Shapes: features [B, T, C] (conv_dim[-1]) -> codevectors [B, T, codevector_dim] and the scalar
perplexity. G = num_codevector_groups codebooks of V = num_codevectors_per_group entries, each
entry codevector_dim / G wide. Parameters as transformers': ``codevectors`` [1, G*V, dim/G],
``weight_proj`` Linear(C, G*V).
"""
from __future__ import annotations

import torch
from torch import nn


class UniSpeechGumbelVectorQuantizer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_groups = config.num_codevector_groups
        self.num_vars = config.num_codevectors_per_group
        if config.codevector_dim % self.num_groups:
            raise ValueError(f"codevector_dim {config.codevector_dim} must be divisible by "
                             f"num_codevector_groups {self.num_groups}")
        self.codevectors = nn.Parameter(
            torch.rand(1, self.num_groups * self.num_vars, config.codevector_dim // self.num_groups))
        self.weight_proj = nn.Linear(config.conv_dim[-1], self.num_groups * self.num_vars)
        self.temperature = 2  # can be decayed during training

    @staticmethod
    def _perplexity(probs: torch.Tensor) -> torch.Tensor:
        """probs [N, G, V] -> sum over groups of exp(entropy of the mean distribution)."""
        marginal = probs.mean(dim=0)
        return torch.exp(-torch.sum(torch.xlogy(marginal, marginal), dim=-1)).sum()

    def forward(self, features: torch.Tensor):
        b, t, _ = features.shape
        n, g, v = b * t, self.num_groups, self.num_vars
        logits = self.weight_proj(features).view(n * g, v)
        if self.training:
            # differentiable hard one-hot samples; perplexity of the soft distribution
            probs = nn.functional.gumbel_softmax(logits.float(), tau=self.temperature, hard=True).type_as(logits)
            perplexity = self._perplexity(torch.softmax(logits.view(n, g, v).float(), dim=-1))
            codevectors = (probs.view(n, g * v, 1) * self.codevectors).view(n, g, v, -1).sum(-2)
        else:
            # hard argmax: gather the chosen entries instead of multiplying a one-hot matrix
            idx = logits.argmax(dim=-1).view(n, g) + torch.arange(g, device=logits.device) * v
            one_hot = torch.zeros(n, g * v, dtype=logits.dtype, device=logits.device)
            one_hot.scatter_(-1, idx, 1.0)
            perplexity = self._perplexity(one_hot.view(n, g, v))
            codevectors = self.codevectors[0][idx]  # [n, G, dim/G]
        return codevectors.reshape(b, t, -1), perplexity
