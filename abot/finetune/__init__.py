"""Fine-tuning stages on top of the pre-training loop: SFT on chat data and DPO/IPO preference tuning.

- `abot.finetune.sources`: registered data sources that yield conversations (`chat`, `oasst1`) or
  preference pairs (`preferences`) instead of text;
- `abot.finetune.batches`: conversations -> padded token batches with an assistant-only loss mask,
  bad input counted per reason;
- `abot.finetune.losses`: the registered `sft`, `dpo` and `ipo` losses;
- `abot.finetune.stage`: what `abot.train.train(cfg, stage=...)` needs for a fine-tuning stage (the
  starting checkpoint, the frozen reference model, the batch stream, evaluation).
"""
