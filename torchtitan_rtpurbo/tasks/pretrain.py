"""What one training step optimises, per trainer mode. The loop (train.py) is the same for all of them.

A task decides which parameters train, prepares the model before it is parallelised, and turns a
micro-batch into a loss already divided by the GLOBAL number of label tokens of the whole step (all
micro-batches, all data-parallel ranks), so summing gradients over ranks and micro-batches gives the
exact mean (FSDP's own gradient division is switched off in parallelize.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionContext

IGNORE_INDEX = -100


def label_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def model_inputs(batch: dict, document_mask: bool) -> dict:
    if document_mask:
        return {"positions": batch["positions"], "doc_ids": batch["doc_ids"]}
    return {}


class PretrainTask:
    """Next-token cross-entropy (+ the MoE load-balancing loss)."""

    name = "pretrain"
    primary_metric = "loss"

    def __init__(self, job_config):
        self.cfg = job_config

    def prepare(self, model: nn.Module, tokenizer=None) -> nn.Module:
        return model

    def trainable_parameters(self, model: nn.Module):
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict, global_tokens: int, n_micro: int, dp: int):
        ctx = AttentionContext(collect={})
        logits = model(batch["input"], ctx=ctx, **model_inputs(batch, self.cfg.training.document_mask))
        ce_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss = ce_sum / global_tokens
        metrics = {"loss_sum": ce_sum.detach()}
        aux = ctx.collect.get("moe_aux_loss")
        if aux:
            coef = model_args(model).router_aux_loss_coef
            aux_mean = torch.stack(aux).mean()
            loss = loss + coef * aux_mean / (n_micro * dp)
            metrics["moe_aux"] = aux_mean.detach() / n_micro
        return loss, metrics


def model_args(model: nn.Module):
    m = model
    while not hasattr(m, "args"):
        m = m.module if hasattr(m, "module") else m._orig_mod
    return m.args
