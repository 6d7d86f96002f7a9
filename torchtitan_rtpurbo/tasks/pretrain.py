"""What one training step optimises, per trainer mode. The loop (train.py) is the same for all of them.

A task decides which parameters train, prepares the model before it is parallelised, and turns a
micro-batch into a loss already divided by the GLOBAL number of label tokens of the whole step (all
micro-batches, all data-parallel ranks), so summing gradients over ranks and micro-batches gives the
exact mean (FSDP's own gradient division is switched off in parallelize.py).

Context parallelism: the trainer hands the tasks micro-batches already sharded over the cp ranks
(context_parallel.shard_batch: the [B, T] tensors hold this rank's tokens, batch["cp"] is the CPContext).
attention_context / model_inputs put the CPContext in ctx.extras["cp"] and pass the global positions; label
counts are this rank's, so sums over all ranks are the global ones and the losses need no other change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionContext

IGNORE_INDEX = -100


def label_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def cp_degree(batch: dict) -> int:
    """How many context-parallel ranks share this micro-batch's sequences (1 without CP)."""
    cp = batch.get("cp")
    return 1 if cp is None else cp.cp


def attention_context(batch: dict, collect: bool = True) -> AttentionContext:
    """The per-forward AttentionContext; carries the batch's CPContext (if any) in extras["cp"]."""
    ctx = AttentionContext(collect={} if collect else None)
    if batch.get("cp") is not None:
        ctx.extras["cp"] = batch["cp"]
    return ctx


def model_inputs(batch: dict, document_mask: bool) -> dict:
    cp = batch.get("cp")
    if document_mask:
        # under CP these are already this rank's tokens (per-document positions, local doc ids; the global
        # doc ids are in the CPContext)
        return {"positions": batch["positions"], "doc_ids": batch["doc_ids"]}
    if cp is not None:
        # without positions the model would number the local tokens 0..Tl-1: give RoPE the global ones
        B = batch["input"].shape[0]
        return {"positions": cp.layout.local_positions(batch["input"].device).expand(B, -1)}
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
        ctx = attention_context(batch)
        logits = model(batch["input"], ctx=ctx, **model_inputs(batch, self.cfg.training.document_mask))
        ce_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss = ce_sum / global_tokens
        metrics = {"loss_sum": ce_sum.detach()}
        aux = ctx.collect.get("moe_aux_loss")
        if aux:
            # the load-balancing loss is computed per rank on its own tokens and averaged over every rank
            # that holds different tokens: dp x cp (gradients are summed over all of them)
            coef = model_args(model).router_aux_loss_coef
            aux_mean = torch.stack(aux).mean()
            loss = loss + coef * aux_mean / (n_micro * dp * cp_degree(batch))
            metrics["moe_aux"] = aux_mean.detach() / n_micro
        return loss, metrics


def model_args(model: nn.Module):
    m = model
    while not hasattr(m, "args"):
        m = m.module if hasattr(m, "module") else m._orig_mod
    return m.args
