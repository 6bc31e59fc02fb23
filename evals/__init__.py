"""Evaluation: perplexity, multiple-choice log-likelihood, generation metrics, few-shot prompts.

    python -m evals.run --config=configs/eval.py:demo --checkpoint=runs/tiny

Modules (each usable from Python):
  scoring          token_logprobs(model, sequences): the batched, jitted scorer everything shares
  perplexity       perplexity / bits per byte of documents, in windows of the model's context; mean_loss of batches
  multiple_choice  MMLU / HellaSwag / ARC / TruthfulQA-MC1 formats, acc and acc_norm as the harness
  generation       decoding through `inference.generate`, stop strings, exact match / BLEU / ROUGE
  fewshot          few-shot context construction and seeded shot selection
  run              the program: suites from configs/eval.py -> results.json + results.md
  length_generalization  the program: one model per position scheme trained at L, perplexity at L, 2L, 4L
"""
