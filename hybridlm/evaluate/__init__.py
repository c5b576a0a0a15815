"""Evaluation: token-weighted perplexity (ppl), MQAR recall (recall), DeepConf voting (deepconf) with a checkable
arithmetic task (arithmetic), and the `hybridlm eval` subcommand (cli). See eval/README.md."""
