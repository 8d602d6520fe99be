"""Data in and answers out: the flat base (paths, qwen, jsonio, config, records, answers, prompts, tokenizer,
digests) and, above it, the API side (api/), the API stages (stages/), evaluation (eval/) and test doubles (testing/)."""
