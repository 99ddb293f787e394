"""Fine-tuning objectives, registered in the `losses` registry as `sft`, `dpo`, `ipo`, `orpo` and `simpo`.

Batches (one micro-batch; see abot.finetune.batches):

- SFT: {"tokens": (B, L + 1) int32, "mask": (B, L) float32}; mask[b, t] = 1 where tokens[b, t + 1] is an
  assistant token (its text and closing <|end|>), 0 on prompts, markers and padding.
- DPO/IPO: {"chosen", "rejected": (B, L + 1) int32, "chosen_mask", "rejected_mask": (B, L) float32 over the
  final assistant response only, "ref_chosen", "ref_rejected": (B,) float32}: the frozen reference model's
  summed response log-probs, computed outside the gradient (abot.finetune.reference.make_reference_fn).
- ORPO/SimPO: the same pairs without "ref_chosen" / "ref_rejected": they compare chosen and rejected under the
  policy alone, with length-normalised log-probs (1/|y|) log pi(y|x), |y| the response's token count.

Each loss has a `batch_kind` attribute ("conversations" or "preferences") that the stage checks; a preference
loss also says whether it compares with the frozen reference model (`needs_reference`), so that the stage
computes the reference's log-probs only for those that do.
"""

from __future__ import annotations

import math

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


def mean_policy_logprobs(model, params, batch: dict, key: mx.array | None):
    """Length-normalised response log-probs (1/|y|) log pi(y|x) of chosen and rejected: ((B,), (B,)).

    ORPO's log P(y|x) and SimPO's reward / beta; |y| is the response's token count (its mask's sum).
    """
    pc, pr = policy_logprobs(model, params, batch, key)
    return pc / response_lengths(batch["chosen_mask"]), pr / response_lengths(batch["rejected_mask"])


def response_lengths(mask: mx.array) -> mx.array:
    """Tokens in each response, (B, L) -> (B,); at least 1, so that an empty row divides by 1, not 0."""
    return mx.maximum(mask.astype(mx.float32).sum(axis=-1), 1.0)


def neg_log_sigmoid(x: mx.array) -> mx.array:
    """-log sigmoid(x) = log(1 + exp(-x)), without overflow for large |x|."""
    return mx.logaddexp(mx.zeros_like(x), -x)


def reward_metrics(chosen: mx.array, rejected: mx.array) -> dict:
    """Means of per-pair implicit rewards, their margin, and the accuracy: the share of pairs whose margin is
    positive (a tie counts as wrong)."""
    margin = chosen - rejected
    return {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(), "reward_margin": margin.mean(),
            "accuracy": (margin > 0).astype(mx.float32).mean()}


def preference_metrics(beta: float, pc, pr, rc, rr) -> dict:
    """DPO's implicit rewards beta * (log pi - log pi_ref), their margin and the preference accuracy (means)."""
    return reward_metrics(beta * (pc - rc), beta * (pr - rr))


def dpo(model, params, batch: dict, key: mx.array | None, beta: float = 0.1):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pc - rc) - (pr - rr))), summed response log-probs."""
    pc, pr = policy_logprobs(model, params, batch, key)
    loss = neg_log_sigmoid(beta * ((pc - batch["ref_chosen"]) - (pr - batch["ref_rejected"]))).mean()
    return loss, preference_metrics(beta, pc, pr, batch["ref_chosen"], batch["ref_rejected"])


dpo.batch_kind = "preferences"
dpo.needs_reference = True


def ipo(model, params, batch: dict, key: mx.array | None, beta: float = 0.1):
    """IPO (Azar et al. 2023): ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, summed response log-probs."""
    pc, pr = policy_logprobs(model, params, batch, key)
    h = (pc - batch["ref_chosen"]) - (pr - batch["ref_rejected"])
    loss = mx.square(h - 1.0 / (2.0 * beta)).mean()
    return loss, preference_metrics(beta, pc, pr, batch["ref_chosen"], batch["ref_rejected"])


ipo.batch_kind = "preferences"
ipo.needs_reference = True


# The highest mean log-prob ORPO's odds are computed at: P = exp(-1e-6), log odds ~13.8. At P = 1 (a mean
# log-prob that rounds to 0 in float32) the log odds would be infinite and their gradient NaN.
MAX_MEAN_LOGPROB = -1e-6


def log_odds(mean_logp: mx.array) -> mx.array:
    """log(P / (1 - P)) = log P - log(1 - P) for P = exp(mean_logp) <= 1, computed stably.

    log(1 - exp(m)) is log(-expm1(m)) for m > -log 2 (near P = 1, where 1 - exp(m) cancels) and log1p(-exp(m))
    below (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"); m is capped at MAX_MEAN_LOGPROB.
    """
    m = mx.minimum(mean_logp, MAX_MEAN_LOGPROB)
    log1m_p = mx.where(m > -math.log(2.0), mx.log(-mx.expm1(m)), mx.log1p(-mx.exp(m)))
    return m - log1m_p


def orpo(model, params, batch: dict, key: mx.array | None, beta: float = 0.1):
    """ORPO (Hong et al. 2024): NLL(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l)).

    No reference model. odds(y) = P / (1 - P) with log P the mean per-token response log-prob; `beta` is the
    paper's lambda (TRL's name for it). The NLL is each chosen response's per-token mean (the paper's
    length-normalised P), averaged over pairs like the odds term, so any split of a batch gives the whole's
    loss (the authors' code averages over all chosen tokens of the batch: equal when lengths are). Rewards as
    TRL's ORPOTrainer reports them: beta * log P; also the NLL and the mean log odds ratio.
    """
    chosen, rejected = mean_policy_logprobs(model, params, batch, key)
    ratio = log_odds(chosen) - log_odds(rejected)
    nll = -chosen.mean()
    loss = nll + beta * neg_log_sigmoid(ratio).mean()
    return loss, {**reward_metrics(beta * chosen, beta * rejected), "nll": nll, "log_odds_ratio": ratio.mean()}


orpo.batch_kind = "preferences"
orpo.needs_reference = False


def simpo(model, params, batch: dict, key: mx.array | None, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al. 2024): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).

    No reference model. Defaults from the paper's ranges (beta 2.0-2.5, gamma/beta about 0.5). Rewards are the
    paper's implicit reward beta/|y| log pi(y|x); the margin is reported without gamma.
    """
    chosen, rejected = mean_policy_logprobs(model, params, batch, key)
    chosen, rejected = beta * chosen, beta * rejected
    return neg_log_sigmoid(chosen - rejected - gamma).mean(), reward_metrics(chosen, rejected)


simpo.batch_kind = "preferences"
simpo.needs_reference = False
