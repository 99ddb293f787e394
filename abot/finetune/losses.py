"""Fine-tuning objectives, registered in the `losses` registry as `sft`, `dpo` and `ipo`.

Batches (one micro-batch; see abot.finetune.batches):

- SFT: {"tokens": (B, L + 1) int32, "mask": (B, L) float32}; mask[b, t] = 1 where tokens[b, t + 1] is an
  assistant token (its text and closing <|end|>), 0 on prompts, markers and padding.
- DPO/IPO: {"chosen", "rejected": (B, L + 1) int32, "chosen_mask", "rejected_mask": (B, L) float32 over the
  final assistant response only, "ref_chosen", "ref_rejected": (B,) float32}: the frozen reference model's
  summed response log-probs, computed outside the gradient (abot.finetune.reference.make_reference_fn).

Each loss has a `batch_kind` attribute ("conversations" or "preferences") that the stage checks.
"""

from __future__ import annotations

import mlx.core as mx

from abot.ops.losses import cross_entropy, token_logprobs


def sft(model, params, batch: dict, key: mx.array | None):
    """Cross-entropy on assistant tokens only (the template's mask), per-sequence padding masked out."""
    tokens, mask = batch["tokens"], batch["mask"]
    logits = model.apply(params, tokens[:, :-1], key=key)
    return cross_entropy(logits, tokens[:, 1:], mask), {"loss_weight": mask.astype(mx.float32).sum()}


sft.batch_kind = "conversations"


def sequence_logprobs(model, params, tokens: mx.array, mask: mx.array, key: mx.array | None = None) -> mx.array:
    """Sum of log p(token) over the positions where `mask` is 1: tokens (B, L + 1), mask (B, L) -> (B,)."""
    logits = model.apply(params, tokens[:, :-1], key=key)
    return (token_logprobs(logits, tokens[:, 1:]) * mask.astype(mx.float32)).sum(axis=-1)


def policy_logprobs(model, params, batch: dict, key: mx.array | None):
    """Summed response log-probs of the chosen and rejected sequences, in one forward pass: ((B,), (B,))."""
    n = batch["chosen"].shape[0]
    tokens = mx.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    mask = mx.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    logps = sequence_logprobs(model, params, tokens, mask, key)
    return logps[:n], logps[n:]


def preference_metrics(beta: float, pc, pr, rc, rr) -> dict:
    """DPO's implicit rewards beta * (log pi - log pi_ref), their margin and the preference accuracy (means)."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    return {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(), "reward_margin": margin.mean(),
            "accuracy": (margin > 0).astype(mx.float32).mean()}


def dpo(model, params, batch: dict, key: mx.array | None, beta: float = 0.1):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pc - rc) - (pr - rr))), summed response log-probs."""
    pc, pr = policy_logprobs(model, params, batch, key)
    logits = beta * ((pc - batch["ref_chosen"]) - (pr - batch["ref_rejected"]))
    loss = mx.logaddexp(mx.zeros_like(logits), -logits).mean()  # -log sigmoid(x) = log(1 + exp(-x)), stable
    return loss, preference_metrics(beta, pc, pr, batch["ref_chosen"], batch["ref_rejected"])


dpo.batch_kind = "preferences"


def ipo(model, params, batch: dict, key: mx.array | None, beta: float = 0.1):
    """IPO (Azar et al. 2023): ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, summed response log-probs."""
    pc, pr = policy_logprobs(model, params, batch, key)
    h = (pc - batch["ref_chosen"]) - (pr - batch["ref_rejected"])
    loss = mx.square(h - 1.0 / (2.0 * beta)).mean()
    return loss, preference_metrics(beta, pc, pr, batch["ref_chosen"], batch["ref_rejected"])


ipo.batch_kind = "preferences"
