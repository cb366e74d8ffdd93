"""``ragseg experiment``: the paper's studies and open questions, each one command (METHOD.md,
"Experiments the paper suggests").

- :mod:`ragseg.experiments.cache`: the feature cache. One pass of the label job's own stages over an
  evaluation set stores every proposal's mask, masked-CLIP query (and, for domain-shift, the CLIP
  feature of its unmasked box crop) and in-vocabulary logits when the proposal model gives them; per
  database under study, a second layer stores each proposal's ``k_max`` nearest neighbours. Keyed by
  everything it depends on, resumable, reused across experiments.
- :mod:`ragseg.experiments.rescore`: re-scoring from the cache with the label job's own pure
  functions (``scoring.retrieval_scores`` / ``clip_scores`` / ``merge_retrieval``,
  ``stages.classify.final_scores`` / ``choose_classes``, ``stages.merge.merge_proposals``,
  ``eval.pq.pq_stats_image``): no model runs, so a sweep point costs milliseconds.
- :mod:`ragseg.experiments.derive`: databases derived from a feature DB (row subsets, class subsets,
  a class removed), each indexed through ``ragseg.index.build``.
- :mod:`ragseg.experiments.world`: the embedded synthetic world (``experiment.world``).
- :mod:`ragseg.experiments.runs`: ``domain-shift``, ``db-size``, ``coverage``, ``sweep``, ``vocab-add``.
- :mod:`ragseg.experiments.report`: ``results.json``, ``results.md``, PNG plots, ``index.html``.
"""

EXPERIMENTS = ("domain-shift", "db-size", "coverage", "sweep", "vocab-add")
