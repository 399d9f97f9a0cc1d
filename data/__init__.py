"""Token shards, the streaming loader and the GPT-2 tokenizer."""
