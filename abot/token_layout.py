"""abot's own id layout: the special ids its SentencePiece tokenizer is trained with and its chat template uses.

Fixed, so checkpoints, token shards and the template can rely on them. A Hugging Face tokenizer has its own
ids: code that must work with both asks the tokenizer (`abot.tokenizer.Tokenizer`), never these constants.
"""

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Chat markers (reserved for the chat template) and "\n", in this order right after the ids above. As
# user-defined symbols each always encodes to exactly one id, wherever it appears in the text.
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
USER_DEFINED_SYMBOLS = (*CHAT_MARKERS, NEWLINE)
FIRST_USER_ID = EOS_ID + 1
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = (FIRST_USER_ID + i for i in range(len(CHAT_MARKERS)))
NEWLINE_ID = FIRST_USER_ID + len(CHAT_MARKERS)
