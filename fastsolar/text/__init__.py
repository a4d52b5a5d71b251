"""Text: what every tokenizer shares (`base`: special tokens, lookups, chat encoding, the streaming decoder), the
sentencepiece tokenizer (`tokenizer`), the tokenizer.json one (`tokenizer_json`), chat templates, stop strings and
streamed text (`chat`)."""
