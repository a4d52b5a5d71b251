"""Text: what every tokenizer shares (`base`), the sentencepiece tokenizer and its streaming decoder
(`tokenizer`), chat templates, stop strings and streamed text (`chat`)."""
