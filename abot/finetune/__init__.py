"""Fine-tuning stages for the one training loop: SFT on chat data and preference tuning (DPO, IPO, ORPO, SimPO).

- `abot.finetune.sources`: registered data sources that yield conversations (`chat`, `oasst1`) or
  preference pairs (`preferences`) instead of text;
- `abot.finetune.batches`: conversations -> padded token batches with an assistant-only loss mask,
  bad input counted per reason;
- `abot.finetune.losses`: the registered `sft`, `dpo`, `ipo`, `orpo` and `simpo` losses;
- `abot.finetune.reference`: the frozen reference model's log-probs for the preference losses that need it
  (`needs_reference`: dpo, ipo).

The stages themselves (pre-training, SFT, DPO) are values in `abot.stage`.
"""
