"""Judging the models: scores, comparisons, ratings, the report and the runs table.

Owns the held-out questions (``questions``) and answering them (``answers``), answer metrics
and paired comparisons (``metrics``), the reference perplexity (``perplexity``), the voice
score (``voice``), the pairwise judge (``judge``), re-scoring prediction files (``rescore``),
Bradley-Terry ratings from the arena's votes (``ratings``) and their length-controlled form
(``style_control``), the comparison report (``report``) and the runs side by side (``runs``).
Imports ``core``, ``models``, ``data`` and ``train`` (its loss, for the reference perplexity).
"""
