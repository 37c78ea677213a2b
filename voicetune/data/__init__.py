"""The author's words as rows: Q&A pairs, blog posts, votes, preference pairs.

Owns reading, validating and splitting Q&A data (``qa``), posts into passages (``posts``),
ingest (posts to grounded Q&A via a generator, ``ingest``), the rewrite task's samples
(``rewrite``) and its pairs from posts by back-translation (``paraphrase``), measures of one
text against another (``text``: content words, copying, function-word profiles), the arena's
votes file (``votes``), and preference pairs (``pairs``: the author against the model;
``vote_pairs``: from arena votes). Imports ``core`` and ``models`` (generation for ingest,
paraphrase and pairs).
"""
