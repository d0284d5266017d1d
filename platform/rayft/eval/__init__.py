"""Evaluation: held-out loss (loss), generation and scoring (generation, scoring), base vs tuned
(compare) on Ray tasks (tasks), lm-evaluation-harness (harness), and the run report (report,
figures)."""
