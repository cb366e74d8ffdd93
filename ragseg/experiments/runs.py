"""The five experiments of ``ragseg experiment`` (what each measures: README "Experiments").

Each ``run_<name>(ctx, out)`` takes models' work only from the feature cache (:mod:`.cache`), builds
whatever databases it studies through the project's own build-db / build-index / refresh code, and
re-scores with :class:`~ragseg.experiments.rescore.Rescorer`. It writes ``results.json``,
``results.md``, PNG plots and ``index.html`` into ``out`` (:mod:`.report`) and returns the results.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragseg import io
from ragseg.config import EnsembleConfig, JobConfig, deep_merge
from ragseg.errors import UserError
from ragseg.experiments import cache as fc
from ragseg.experiments.report import Report
from ragseg.experiments.rescore import GroundTruth, Rescorer, Retrieval, class_subset_pq
from ragseg.experiments.world import Dataset, datasets, gt_paths, pick, pick_with_db

TITLES = {
    "domain-shift": "Domain shift: CLIP on full vs masked regions vs retrieval",
    "db-size": "PQ against database size",
    "coverage": "PQ against the database's class coverage, with and without the fallback database",
    "sweep": "alpha / beta / gamma: tuned on one dataset, applied to another",
    "vocab-add": "Training-free vocabulary update: add N examples of a new class",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def track(items: Iterable, total: int, description: str, enabled: bool):
    """A rich progress bar over a long loop (a no-op when ``ray.progress`` is off)."""
    items = list(items)
    if not enabled or total <= 1:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as p:
        task = p.add_task(description, total=total)
        for it in items:
            yield it
            p.advance(task)


@dataclass
class Context:
    cfg: JobConfig
    config_path: str
    sets: list[Dataset] = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    _vocab: dict = field(default_factory=dict)
    _fs: dict = field(default_factory=dict)
    _rs: dict = field(default_factory=dict)
    _nb: dict = field(default_factory=dict)
    _text: dict = field(default_factory=dict)

    @classmethod
    def make(cls, cfg: JobConfig, config_path: str) -> Context:
        sets, extras = datasets(cfg)
        return cls(cfg, config_path, sets, extras)

    @property
    def progress(self) -> bool:
        return self.cfg.ray.progress

    def with_label(self, **label: Any) -> JobConfig:
        return JobConfig.model_validate(deep_merge(self.cfg.model_dump(mode="json"), {"label": label}))

    def vocab(self, d: Dataset):
        if d.vocab not in self._vocab:
            from ragseg.vocab import load_vocab

            self._vocab[d.vocab] = load_vocab(d.vocab, synonyms=self.cfg.label.synonyms)
        return self._vocab[d.vocab]

    def index_of(self, d: Dataset) -> str:
        if d.index:
            return d.index
        if not d.db:
            raise UserError(f"experiment dataset {d.name} has neither index nor db")
        from ragseg.experiments.derive import all_rows, derived_index

        d.index = derived_index(self.cfg, d.db, {"kind": "all"}, all_rows)["index"]
        return d.index

    def rescorer(self, d: Dataset, full: bool = False, cfg: JobConfig | None = None) -> Rescorer:
        cfg = cfg or self.cfg
        key = (d.name, cfg.label.proposals, full)
        if key not in self._rs:
            vocab = self.vocab(d)
            uri = fc.ensure_features(cfg, d.images, vocab, full=full)
            fs = fc.load_features(uri)
            self._fs[key] = fs
            text = None
            if d.vocab not in self._text:
                self._text[d.vocab] = fc.text_embeddings(cfg, vocab)
            text = self._text[d.vocab]
            from ragseg.scoring import in_train_mask

            ens = cfg.label.ensemble
            self._rs[key] = Rescorer(fs, GroundTruth.load(d.gt_json, d.gt_dir, fs), vocab, text,
                                     in_train_mask(vocab, ens.trained_classes), ens.trained_classes,
                                     self.cfg.experiment.mask_cache_mb)
        return self._rs[key]

    def neighbours(self, r: Rescorer, index_uri: str, queries: str = "masked") -> fc.Neighbours:
        from ragseg.index.faiss_util import quiet_stdout
        from ragseg.index.store import Index
        from ragseg.index.versions import current_version

        key = (r.fs.key, index_uri, current_version(index_uri), queries)
        if key not in self._nb:
            with quiet_stdout():  # faiss prints a line per on-disk list file it maps
                index = Index.open(index_uri)
            self._nb[key] = fc.ensure_neighbours(self.cfg, r.fs, index_uri, queries, index=index)
        return self._nb[key]

    def provenance(self, databases: dict[str, str], seeds: list[int] | None = None, **extra: Any) -> dict:
        return {"config": self.config_path, "config_hash": self.cfg.hash(), "proposals": self.cfg.label.proposals,
                "ensemble": self.cfg.label.ensemble.model_dump(mode="json"),
                "merge": self.cfg.label.merge.model_dump(mode="json"), "cache": self.cfg.experiment.cache,
                "databases": databases, "seeds": seeds,
                "world": self.extras.get("describe") if self.extras else None, **extra}


def db_label(nb: fc.Neighbours) -> str:
    return f"{nb.index_uri}@{nb.version} ({nb.count} segments)"


def _ens(ens: EnsembleConfig, **kw: Any) -> EnsembleConfig:
    return ens.model_copy(update=kw)


def _pqrow(res: dict) -> dict:
    return {"pq": res["All"]["pq"], "sq": res["All"]["sq"], "rq": res["All"]["rq"],
            "pq_things": res["Things"]["pq"], "pq_stuff": res["Stuff"]["pq"]}


# ==============================================================================================
# domain-shift
# ==============================================================================================
def _domain_shift_ways(ens: EnsembleConfig, nb: fc.Neighbours, nb_full: fc.Neighbours) -> list[tuple]:
    """The four ways ground-truth segments are classified: (key, description, ensemble, retrieval, queries)."""
    return [
        ("clip-full", "CLIP on the unmasked box crop", _ens(ens, scores="clip"), Retrieval(None), "full"),
        ("clip-masked", "CLIP on the masked segment", _ens(ens, scores="clip"), Retrieval(None), "masked"),
        ("retrieval-masked", "retrieval: masked query vs masked keys", _ens(ens, scores="retrieval"),
         Retrieval(nb), "masked"),
        ("retrieval-full-query", "retrieval: full-crop query vs masked keys", _ens(ens, scores="retrieval"),
         Retrieval(nb_full), "full"),
    ]


def _classify_ways(r: Rescorer, ways: list[tuple], true: np.ndarray, vocab, merge) -> tuple[list[list], dict]:
    """Accuracy and PQ of each way: (table rows, results by way key)."""
    rows, results = [], {}
    for key, desc, e, ret, queries in ways:
        dec = r.decide(e, ret, queries)
        pred = np.concatenate([c_ for c_, _ in dec]) if dec else np.zeros(0, np.int64)
        ok = true >= 0
        top1 = float(np.mean(pred[ok] == true[ok])) if ok.any() else float("nan")
        per_class = {}
        for ci in np.unique(true[ok]):
            sel = true == ci
            per_class[vocab.names[int(ci)]] = float(np.mean(pred[sel] == ci))
        mca = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        res = r.pq(dec, merge)
        results[key] = {"description": desc, "top1": top1, "mean_class_accuracy": mca, "per_class_accuracy": per_class,
                        **_pqrow(res), "per_class_pq": {p["name"]: p["pq"] for p in res["per_class"] if p["present"]}}
        rows.append([desc, 100 * top1, 100 * mca, res["All"]["pq"], res["Things"]["pq"], res["Stuff"]["pq"]])
    return rows, results


def _mmd_shift(full: np.ndarray, masked: np.ndarray, true: np.ndarray, vocab, c) -> tuple[list[list], dict, dict | None]:
    """The shift itself: per-class MMD between full-crop and masked features (+ a masked-vs-masked null),
    and over all classes: (table rows, per class, overall or None)."""
    from ragseg.experiments.stats import mmd_rbf

    rng = np.random.default_rng(c.seed)
    mmd_rows, mmd = [], {}
    for ci in np.unique(true[true >= 0]):
        sel = np.flatnonzero(true == ci)
        if len(sel) < c.min_class_segments:
            continue
        sel = rng.permutation(sel)[: c.mmd_max_per_class]
        m2, sigma = mmd_rbf(full[sel], masked[sel])
        half = len(sel) // 2
        null, _ = mmd_rbf(masked[sel[:half]], masked[sel[half:]], sigma)
        cos = float(np.mean(np.sum(full[sel] * masked[sel], axis=1)))
        name = vocab.names[int(ci)]
        mmd[name] = {"mmd2": m2, "sigma": sigma, "null_mmd2": null, "n": int(len(sel)), "cos_full_masked": cos}
        mmd_rows.append([name, len(sel), m2, null, sigma, cos])
    everything = rng.permutation(np.flatnonzero(true >= 0))[: c.mmd_max_per_class]
    overall = None
    if len(everything) >= 4:
        m2, sigma = mmd_rbf(full[everything], masked[everything])
        half = len(everything) // 2
        null, _ = mmd_rbf(masked[everything[:half]], masked[everything[half:]], sigma)
        overall = {"mmd2": m2, "sigma": sigma, "null_mmd2": null, "n": int(len(everything))}
        mmd_rows.append(["(all classes)", len(everything), m2, null, sigma,
                         float(np.mean(np.sum(full[everything] * masked[everything], axis=1)))])
    return mmd_rows, mmd, overall


def _domain_shift_figures(rep: Report, ways: list[tuple], results: dict, mmd: dict, name: str) -> None:
    """The classification bar chart and, when there is a per-class MMD, its bar chart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(len(ways))
    for j, (metric, lab) in enumerate((("top1", "top-1 accuracy %"), ("mean_class_accuracy", "mean class accuracy %"),
                                       ("pq", "PQ (gt masks)"))):
        vals = [results[k][metric] * (100 if metric != "pq" else 1) for k, *_ in ways]
        ax.bar(xs + (j - 1) * 0.27, vals, 0.27, label=lab)
    short = {"clip-full": "CLIP\nfull box crop", "clip-masked": "CLIP\nmasked segment",
             "retrieval-masked": "retrieval\nmasked query, masked keys",
             "retrieval-full-query": "retrieval\nfull-crop query, masked keys"}
    ax.set_xticks(xs, [short[w[0]] for w in ways], fontsize=7)
    ax.set_ylabel("%")
    ax.set_title(f"Domain shift on {name}")
    ax.legend(fontsize=7)
    rep.figure(fig, "classification", "Ground-truth segments classified four ways")
    if mmd:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        names = list(mmd)
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [mmd[n]["mmd2"] for n in names], 0.4, label="full vs masked")
        ax.bar(xs + 0.2, [mmd[n]["null_mmd2"] for n in names], 0.4, label="masked vs masked (null)")
        ax.set_xticks(xs, names, rotation=45, fontsize=7)
        ax.set_ylabel("MMD^2")
        ax.set_title("Per-class MMD^2 between full-crop and masked CLIP features")
        ax.legend(fontsize=7)
        rep.figure(fig, "mmd", "Per-class MMD (RBF, median heuristic)")


def run_domain_shift(ctx: Context, out: str) -> dict:
    c = ctx.cfg.experiment.domain_shift
    d = pick(ctx.sets, c.dataset, "domain-shift")
    cfg = ctx.with_label(proposals="gt")  # ground-truth segments, classified three ways
    r = ctx.rescorer(d, full=True, cfg=cfg)
    vocab = ctx.vocab(d)
    idx = ctx.index_of(d)
    nb = ctx.neighbours(r, idx, "masked")
    nb_full = ctx.neighbours(r, idx, "full")
    ens = cfg.label.ensemble
    merge = cfg.label.merge
    true = vocab.indices_of(r.fs.labels) if r.fs.n_proposals else np.zeros(0, np.int64)
    ways = _domain_shift_ways(ens, nb, nb_full)
    rows, results = _classify_ways(r, ways, true, vocab, merge)
    full = np.asarray(r.fs.full, np.float32)
    masked = np.asarray(r.fs.queries, np.float32)
    mmd_rows, mmd, overall = _mmd_shift(full, masked, true, vocab, c)

    rep = Report(out, "domain-shift", ctx.provenance({d.name: db_label(nb)}, [c.seed],
                                                    dataset=d.name, cache=r.fs.uri))
    rep.note(f"Dataset {d.name}: {r.fs.n_images} images, {int((true >= 0).sum())} ground-truth segments "
             f"(label.proposals=gt), classified by CLIP text scores (T={ens.clip_temperature}) or retrieval "
             f"(k={ens.k}, T={ens.retrieval_temperature}). 'Masked' is the feature the DB holds "
             f"(models.clip.mode={cfg.models.clip.mode}); 'full' is CLIP on the unmasked padded box crop.")
    rep.table("Segment classification", ["method", "top-1 %", "mean class acc %", "PQ", "PQ things", "PQ stuff"], rows)
    rep.table("Masked-feature shift: MMD^2 (RBF kernel, median-heuristic bandwidth) between full-crop and masked "
              "features per class; null = MMD^2 between two halves of the masked features",
              ["class", "segments", "MMD^2 full vs masked", "MMD^2 null", "sigma", "mean cos(full, masked)"],
              mmd_rows, digits=4)
    _domain_shift_figures(rep, ways, results, mmd, d.name)
    emb = _embedding_plot(rep, full, masked, true, vocab, c, d.name)
    return rep.write(TITLES["domain-shift"], {"dataset": d.name, "methods": results, "mmd": mmd,
                                              "mmd_overall": overall, "embedding": emb})


def _embedding_plot(rep: Report, full, masked, true, vocab, c, name: str) -> dict:
    ok = np.flatnonzero(true >= 0)
    if len(ok) < 5:
        return {"points": 0}
    sel = np.random.default_rng(c.seed).permutation(ok)[: c.max_points]
    x = np.concatenate([masked[sel], full[sel]])
    if c.plot == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("experiment.domain_shift.plot=umap needs the umap-learn package; use tsne") from None
        xy = umap.UMAP(random_state=c.seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=float(min(30.0, (len(x) - 1) / 3.0)), init="pca",
                  random_state=c.seed).fit_transform(x)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab20")
    n = len(sel)
    for j, ci in enumerate(np.unique(true[sel])):
        m = true[sel] == ci
        col = cmap(j % 20)
        ax.scatter(xy[:n][m, 0], xy[:n][m, 1], s=14, color=col, marker="o", label=vocab.names[int(ci)])
        ax.scatter(xy[n:][m, 0], xy[n:][m, 1], s=18, color=col, marker="x")
    ax.set_title(f"{c.plot.upper()} of CLIP features on {name}: o masked, x full box crop")
    ax.legend(fontsize=6, ncol=2, markerscale=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    rep.figure(fig, "embedding", f"{c.plot} of masked (o) and full-crop (x) features, coloured by class")
    return {"points": int(n), "method": c.plot}


# ==============================================================================================
# db-size
# ==============================================================================================
def run_db_size(ctx: Context, out: str) -> dict:
    from ragseg.experiments.derive import db_labels, derived_index, rows_in
    from ragseg.experiments.stats import mean_std, saturation

    c = ctx.cfg.experiment.db_size
    d = pick_with_db(ctx.sets, c.dataset, "db-size")
    r = ctx.rescorer(d)
    N = len(db_labels(d.db))
    fractions = sorted(set(c.fractions))
    jobs = []
    for seed in c.seeds:
        perm = np.random.default_rng(seed).permutation(N)
        for f in fractions:
            size = max(1, min(N, int(round(f * N))))
            spec = {"kind": "rows", "size": size} if size == N else {"kind": "rows", "seed": seed, "size": size}
            jobs.append((seed, f, size, spec, perm[:size]))
    points = []
    for seed, f, size, spec, pos in track(jobs, len(jobs), "db-size: subsets (build-index + re-score)", ctx.progress):
        info = derived_index(ctx.cfg, d.db, spec, rows_in(pos))
        nb = ctx.neighbours(r, info["index"])
        res = r.evaluate(ctx.cfg.label.ensemble, Retrieval(nb), ctx.cfg.label.merge)
        rec = info.get("recall") or {}
        points.append({"seed": seed, "fraction": f, "size": size, "classes": len(info["labels"]), **_pqrow(res),
                       "ten_recall_at_10": rec.get("ten_recall_at_10"), "vote_agreement": rec.get("vote_agreement"),
                       "index": f"{info['index']}@{info['version']}", "factory": info.get("factory")})
    summary = []
    for f in fractions:
        pts = [p for p in points if p["fraction"] == f]
        m, s = mean_std([p["pq"] for p in pts])
        rm, _ = mean_std([p["ten_recall_at_10"] for p in pts])
        summary.append({"fraction": f, "size": pts[0]["size"], "pq_mean": m, "pq_std": s, "runs": len(pts),
                        "classes_mean": float(np.mean([p["classes"] for p in pts])), "recall10_mean": rm})
    sat = saturation([s["size"] for s in summary], [s["pq_mean"] for s in summary], c.saturation_pq)
    rep = Report(out, "db-size", ctx.provenance({d.name: f"{d.db} ({N} segments), nested random subsets"},
                                                list(c.seeds), dataset=d.name))
    rep.note(f"Nested random subsets of {d.db} ({N} segments), seeds {list(c.seeds)}; each subset is a feature "
             f"DB of its own, indexed by ragseg.index.build.build_index (publish gate off, recall recorded). "
             f"Saturation: the smallest size whose mean PQ is within {c.saturation_pq} of the full DB's: "
             f"{sat if sat is not None else '-'} segments.")
    rep.table("PQ against database size (mean over seeds)",
              ["fraction", "segments", "classes", "PQ mean", "PQ std", "runs", "10-recall@10"],
              [[f"{100 * s['fraction']:g}%", s["size"], s["classes_mean"], s["pq_mean"], s["pq_std"], s["runs"],
                s["recall10_mean"]] for s in summary])
    rep.table("Every run", ["seed", "fraction", "segments", "classes", "PQ", "PQ things", "PQ stuff",
                            "10-recall@10", "vote agreement", "index"],
              [[p["seed"], f"{100 * p['fraction']:g}%", p["size"], p["classes"], p["pq"], p["pq_things"], p["pq_stuff"],
                p["ten_recall_at_10"], p["vote_agreement"], p["index"]] for p in points], digits=3)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = np.array([s["size"] for s in summary], float)
    mu = np.array([s["pq_mean"] for s in summary])
    sd = np.nan_to_num(np.array([s["pq_std"] for s in summary]))
    ax.plot(xs, mu, "o-", label="mean PQ")
    ax.fill_between(xs, mu - sd, mu + sd, alpha=0.25, label="± 1 std over seeds")
    ax.scatter([p["size"] for p in points], [p["pq"] for p in points], s=8, color="k", alpha=0.4, label="runs")
    if sat is not None and sat < N:
        ax.axvline(sat, ls="--", color="r", label=f"within {c.saturation_pq:g} PQ of the full DB from {int(sat)} segments")
    elif sat is not None:
        ax.plot([], [], " ", label=f"no saturation: only the full DB is within {c.saturation_pq:g} PQ of itself")
    ax.set_xscale("log")
    ax.set_xlabel("database segments")
    ax.set_ylabel("PQ")
    ax.set_title(f"PQ against database size on {d.name}")
    ax.legend(fontsize=7)
    rep.figure(fig, "db_size", "PQ against database size (nested random subsets)")
    return rep.write(TITLES["db-size"], {"dataset": d.name, "db_segments": N, "points": points,
                                         "summary": summary, "saturation_segments": sat})


# ==============================================================================================
# coverage
# ==============================================================================================
def _coverage_jobs(seeds: Iterable[int], fractions: Iterable[float], present: list[int]) -> list[tuple]:
    """(seed, fraction, covered class indices) of each class subset: a seeded permutation's first share."""
    jobs = []
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(present)
        for f in sorted(set(fractions)):
            m = int(round(f * len(present)))
            if m == 0:
                continue
            covered = sorted(int(x) for x in perm[:m])
            jobs.append((seed, f, covered))
    return jobs


def _coverage_summary(points: list[dict]) -> list[dict]:
    """Mean and std over seeds of PQ (all, covered, uncovered) per coverage fraction and fallback use."""
    from ragseg.experiments.stats import mean_std

    summary = []
    for f in sorted({p["fraction"] for p in points}):
        for fb in sorted({p["fallback"] for p in points}):
            pts = [p for p in points if p["fraction"] == f and p["fallback"] == fb]
            row = {"fraction": f, "fallback": fb, "runs": len(pts)}
            for k in ("pq", "pq_covered", "pq_uncovered"):
                row[k + "_mean"], row[k + "_std"] = mean_std([p[k] for p in pts])
            summary.append(row)
    return summary


def _coverage_plot(rep: Report, summary: list[dict], name: str) -> None:
    """PQ of covered and uncovered classes against coverage, with and without the fallback DB."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {(False, "pq_covered"): ("C0", "-", "covered, no fallback"),
              (False, "pq_uncovered"): ("C3", "-", "uncovered, no fallback"),
              (True, "pq_covered"): ("C0", "--", "covered, with fallback"),
              (True, "pq_uncovered"): ("C3", "--", "uncovered, with fallback")}
    for (fb, k), (col, ls, lab) in styles.items():
        rows = [s for s in summary if s["fallback"] == fb and not np.isnan(s[k + "_mean"])]
        if not rows:
            continue
        xs = np.array([100 * s["fraction"] for s in rows])
        mu = np.array([s[k + "_mean"] for s in rows])
        sd = np.nan_to_num(np.array([s[k + "_std"] for s in rows]))
        ax.plot(xs, mu, marker="o", color=col, ls=ls, label=lab)
        ax.fill_between(xs, mu - sd, mu + sd, color=col, alpha=0.12)
    ax.set_xlabel("classes covered by the primary DB (%)")
    ax.set_ylabel("PQ")
    ax.set_title(f"Coverage on {name}")
    ax.legend(fontsize=7)
    rep.figure(fig, "coverage", "PQ of covered and uncovered classes, with and without the fallback DB")


def run_coverage(ctx: Context, out: str) -> dict:
    from ragseg.experiments.derive import db_labels, derived_index, labels_in

    c = ctx.cfg.experiment.coverage
    d = pick_with_db(ctx.sets, c.dataset, "coverage")
    r = ctx.rescorer(d)
    vocab = ctx.vocab(d)
    labels = db_labels(d.db)
    present = sorted({int(i) for i in vocab.indices_of(np.unique(labels.astype(str))) if i >= 0})
    nb_fb = ctx.neighbours(r, d.fallback_index) if d.fallback_index else None
    ens, merge = ctx.cfg.label.ensemble, ctx.cfg.label.merge
    jobs = _coverage_jobs(c.seeds, c.fractions, present)
    points = []
    for seed, f, covered in track(jobs, len(jobs), "coverage: class subsets (build-index + re-score)", ctx.progress):
        names = [vocab.names[i] for i in covered]
        info = derived_index(ctx.cfg, d.db, {"kind": "classes", "classes": names}, labels_in(vocab, set(covered)))
        nb = ctx.neighbours(r, info["index"])
        cov = set(names)
        unc = {vocab.names[i] for i in range(len(vocab)) if vocab.names[i] not in cov}
        for use_fb in ([False, True] if nb_fb is not None else [False]):
            res = r.evaluate(ens, Retrieval(nb, nb_fb if use_fb else None), merge)
            pc = class_subset_pq(res, cov)
            pu = class_subset_pq(res, unc)
            points.append({"seed": seed, "fraction": f, "covered": sorted(cov), "uncovered": sorted(unc),
                           "fallback": use_fb, **_pqrow(res), "pq_covered": pc["pq"], "pq_uncovered": pu["pq"],
                           "n_covered": pc["n"], "n_uncovered": pu["n"],
                           "per_class": {p["name"]: p["pq"] for p in res["per_class"] if p["present"]},
                           "index": f"{info['index']}@{info['version']}"})
    summary = _coverage_summary(points)
    dbs = {d.name: f"{d.db} ({len(labels)} segments), class subsets"}
    if nb_fb is not None:
        dbs["fallback"] = db_label(nb_fb)
    rep = Report(out, "coverage", ctx.provenance(dbs, list(c.seeds), dataset=d.name))
    rep.note(f"The primary DB keeps only the segments of a seeded subset of the {len(present)} classes it holds "
             f"(each subset indexed by build_index); uncovered classes can only come from CLIP or, with the "
             f"fallback, from the fallback DB (label.fallback_index semantics: its neighbours vote only for "
             f"classes the primary lacks). PQ means over the covered / uncovered classes present in the ground truth.")
    rep.table("PQ by coverage (mean ± std over seeds)",
              ["coverage", "fallback", "PQ all", "±", "PQ covered", "±", "PQ uncovered", "±", "runs"],
              [[f"{100 * s['fraction']:.0f}%", s["fallback"], s["pq_mean"], s["pq_std"], s["pq_covered_mean"],
                s["pq_covered_std"], s["pq_uncovered_mean"], s["pq_uncovered_std"], s["runs"]] for s in summary])
    rep.table("Every run", ["seed", "coverage", "fallback", "PQ", "PQ covered", "PQ uncovered", "uncovered classes"],
              [[p["seed"], f"{100 * p['fraction']:g}%", p["fallback"], p["pq"], p["pq_covered"], p["pq_uncovered"],
                ", ".join(p["uncovered"])] for p in points])
    _coverage_plot(rep, summary, d.name)
    return rep.write(TITLES["coverage"], {"dataset": d.name, "classes": [vocab.names[i] for i in present],
                                          "points": points, "summary": summary})


# ==============================================================================================
# sweep
# ==============================================================================================
def _sweep_pq(ctx: Context, sets: dict[str, tuple], names: list[str], grid: list[tuple]) -> tuple[dict, dict]:
    """PQ of every grid point on each dataset, re-scored from the cache, and the re-scoring cost:
    (dataset -> PQ per point, dataset -> timing)."""
    ens0 = ctx.cfg.label.ensemble
    pq = {name: np.zeros(len(grid)) for name in sets}
    timing = {}
    for name, (_d, r, ret) in sets.items():
        t0 = time.perf_counter()
        merges0 = r.merges
        for j, point in track(list(enumerate(grid)), len(grid), f"sweep on {name}: {len(grid)} points", ctx.progress):
            e = _ens(ens0, scores="ensemble", **dict(zip(names, point)))
            pq[name][j] = r.evaluate(e, ret, ctx.cfg.label.merge)["All"]["pq"]
        sec = time.perf_counter() - t0
        timing[name] = {"points": len(grid), "seconds": sec, "proposals": r.fs.n_proposals,
                        "images": r.fs.n_images, "proposals_per_second_per_point": r.fs.n_proposals * len(grid) / sec,
                        "merges_computed": r.merges - merges0, "merges_possible": r.fs.n_images * len(grid)}
    return pq, timing


def _sweep_heatmaps(rep: Report, axes: dict[str, list], grid: list[tuple], pq: dict[str, np.ndarray],
                    datasets: tuple[str, str], best_a: dict, paper: dict) -> None:
    """One PQ heat map per pair of swept axes (max over the other axes), on the tune and apply datasets,
    marking the tune set's best point and the paper's."""
    names = list(axes)
    swept = [n for n in names if len(axes[n]) > 1]
    plt = _plt()
    for a1, a2 in itertools.combinations(swept, 2):
        fig, axs = plt.subplots(1, 2, figsize=(10, 4.2))
        for ax, name in zip(axs, datasets):
            mat = np.full((len(axes[a1]), len(axes[a2])), -np.inf)
            for j, p in enumerate(grid):
                pd = dict(zip(names, p))
                i1, i2 = axes[a1].index(pd[a1]), axes[a2].index(pd[a2])
                mat[i1, i2] = max(mat[i1, i2], pq[name][j])
            im = ax.imshow(mat, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(axes[a2])), [f"{v:g}" for v in axes[a2]], fontsize=7)
            ax.set_yticks(range(len(axes[a1])), [f"{v:g}" for v in axes[a1]], fontsize=7)
            ax.set_xlabel(a2)
            ax.set_ylabel(a1)
            ax.set_title(f"PQ on {name} (max over the other axes)", fontsize=9)
            for mark, pt, col in (("*", best_a, "r"), ("s", paper, "w")):
                ax.plot(axes[a2].index(pt[a2]), axes[a1].index(pt[a1]), mark, color=col, ms=9, mfc="none")
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{a1} x {a2}: red * best on {datasets[0]}, white square the paper's point", fontsize=9)
        rep.figure(fig, f"heatmap_{a1}_{a2}", f"PQ heat map over {a1} x {a2}")


def run_sweep(ctx: Context, out: str) -> dict:
    c = ctx.cfg.experiment.sweep
    ens0 = ctx.cfg.label.ensemble
    A = pick(ctx.sets, c.tune, "sweep (tune)", 0)
    B = pick(ctx.sets, c.apply, "sweep (apply)", 1)
    axes = {"alpha": sorted(set(c.alpha) | {0.4}), "beta": sorted(set(c.beta) | {0.7}),
            "gamma": sorted(set(c.gamma) | {0.3}), "k": sorted(set(c.k) | {ens0.k}),
            "retrieval_temperature": sorted(set(c.retrieval_temperature) | {ens0.retrieval_temperature})}
    sets = {}
    for d in (A, B):
        r = ctx.rescorer(d)
        nb = ctx.neighbours(r, ctx.index_of(d))
        fb = ctx.neighbours(r, d.fallback_index) if d.fallback_index else None
        sets[d.name] = (d, r, Retrieval(nb, fb))
    has_iv = all(r.fs.iv_logits is not None for _, r, _ in sets.values())
    notes = []
    if not has_iv:
        axes["alpha"], axes["beta"] = [0.4], [0.7]
        notes.append(f"label.proposals={ctx.cfg.label.proposals} gives no in-vocabulary scores (s_iv), so the final "
                     "score is s_oov: alpha and beta change nothing and are held at the paper's 0.4 / 0.7; the grid "
                     "sweeps gamma, k and the retrieval temperature instead.")
    names = list(axes)
    grid = list(itertools.product(*(axes[n] for n in names)))
    paper = {"alpha": 0.4, "beta": 0.7, "gamma": 0.3, "k": ens0.k, "retrieval_temperature": ens0.retrieval_temperature}
    pq, timing = _sweep_pq(ctx, sets, names, grid)
    ia = int(np.argmax(pq[A.name]))
    ib = int(np.argmax(pq[B.name]))
    ip = grid.index(tuple(paper[n] for n in names))
    best_a = dict(zip(names, grid[ia]))
    best_b = dict(zip(names, grid[ib]))
    res = {
        "tune": A.name, "apply": B.name, "axes": axes, "grid_points": len(grid),
        "best_on_tune": {"params": best_a, "pq_tune": pq[A.name][ia], "pq_apply": pq[B.name][ia]},
        "best_on_apply": {"params": best_b, "pq_apply": pq[B.name][ib], "pq_tune": pq[A.name][ib]},
        "paper": {"params": paper, "pq_tune": pq[A.name][ip], "pq_apply": pq[B.name][ip]},
        "transfer_loss": float(pq[B.name][ib] - pq[B.name][ia]),
        "points": [{**dict(zip(names, p)), "pq_" + A.name: float(pq[A.name][j]), "pq_" + B.name: float(pq[B.name][j])}
                   for j, p in enumerate(grid)],
        "timing": timing,
    }
    dbs = {n: db_label(ret.primary) for n, (_, _, ret) in sets.items()}
    rep = Report(out, "sweep", ctx.provenance(dbs, None, tune=A.name, apply=B.name))
    for n_ in notes:
        rep.note(n_)
    rep.note(f"Grid: {', '.join(f'{k} {v}' for k, v in axes.items())} ({len(grid)} points; the paper's "
             f"alpha 0.4 / beta 0.7 / gamma 0.3 with the config's k and temperature is one of them). Tuned on "
             f"{A.name}, applied to {B.name} without re-tuning. Transfer loss = best PQ on {B.name} - PQ on "
             f"{B.name} at {A.name}'s best = {res['transfer_loss']:.2f}.")

    def pstr(p):
        return ", ".join(f"{k}={v:g}" for k, v in p.items() if len(axes[k]) > 1 or k in ("alpha", "beta", "gamma"))

    rep.table("Best points and the paper's", ["point", "parameters", f"PQ on {A.name}", f"PQ on {B.name}"], [
        [f"best on {A.name}", pstr(best_a), res["best_on_tune"]["pq_tune"], res["best_on_tune"]["pq_apply"]],
        [f"best on {B.name}", pstr(best_b), res["best_on_apply"]["pq_tune"], res["best_on_apply"]["pq_apply"]],
        ["paper (0.4 / 0.7 / 0.3)", pstr(paper), res["paper"]["pq_tune"], res["paper"]["pq_apply"]],
        ["transfer loss", "", "", res["transfer_loss"]]])
    rep.table("Re-scoring cost", ["dataset", "points", "seconds", "proposals", "proposals/s per point",
                                  "merges computed / possible"],
              [[n, t["points"], t["seconds"], t["proposals"], t["proposals_per_second_per_point"],
                f"{t['merges_computed']} / {t['merges_possible']}"] for n, t in timing.items()])
    _sweep_heatmaps(rep, axes, grid, pq, (A.name, B.name), best_a, paper)
    return rep.write(TITLES["sweep"], res)


# ==============================================================================================
# vocab-add
# ==============================================================================================
def _pool_examples(pool_json: str, vocab, xi: int, min_area: int, seed: int) -> list[tuple[dict, list[dict]]]:
    """(image entry, its X segments largest first) of every pool image with an X segment, seeded order."""
    doc = io.read_json(pool_json)
    cats = {int(cc["id"]): cc for cc in doc["categories"]}
    anns = {a["image_id"]: a for a in doc["annotations"]}
    out = []
    for im in doc["images"]:
        a = anns.get(im["id"])
        if a is None:
            continue
        segs = [s for s in a["segments_info"] if not s.get("iscrowd") and int(s.get("area", min_area)) >= min_area
                and vocab.index_of(str(cats[int(s["category_id"])]["name"])) == xi]
        if segs:
            out.append((im, sorted(segs, key=lambda s: -int(s.get("area", 0)))))
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def _vocab_add_class(class_name: str | None, vocab, vocab_uri: str) -> tuple[str, int]:
    """The class to add (the configured one, else the vocabulary's first thing) and its vocabulary index."""
    x_name = class_name or next(n for n, t in zip(vocab.names, vocab.isthing) if t)
    xi = vocab.index_of(x_name)
    if xi is None:
        raise UserError(f"vocab-add class {x_name!r} is not in the vocabulary {vocab_uri}")
    return x_name, xi


def _base_without_class(ctx: Context, source_db: str, work: str, vocab, xi: int) -> tuple[str, str, dict, float]:
    """A fresh ``work`` folder holding a copy of ``source_db`` without class ``xi`` and its index:
    (db, index, write_subset_db's counts, seconds to the published index)."""
    from ragseg.experiments.derive import index_cfg, write_subset_db
    from ragseg.index.build import build_index

    if io.exists(work):
        io.remove(work, recursive=True)
    db, index = io.join(work, "db"), io.join(work, "index")
    t0 = time.perf_counter()
    base = write_subset_db(source_db, db, lambda _s, t: vocab.indices_of(
        np.asarray(t.column("label").cast("string").to_pylist(), dtype=object)) != xi)
    build_index(db, index_cfg(ctx.cfg, index))
    return db, index, base, time.perf_counter() - t0


def _checked_examples(ctx: Context, db: str, source_db: str, pool_json: str, vocab, xi: int, x_name: str,
                      seed: int, counts: list[int]) -> list[tuple[dict, list[dict]]]:
    """The pool's examples of the class (:func:`_pool_examples`), after checking that no pool image is
    already in the DB and that the pool has as many segments as the largest count asks for."""
    from ragseg import ledger
    from ragseg.db import KIND as DB_KIND

    covered = set(ledger.load(db, DB_KIND).covered_image_ids().to_pylist())
    examples = _pool_examples(pool_json, vocab, xi, ctx.cfg.build_db.min_segment_area, seed)
    clash = [im["file_name"] for im, _ in examples
             if str(im["file_name"]).rsplit("/", 1)[-1].rsplit(".", 1)[0] in covered]
    if clash:
        raise UserError(f"vocab-add: pool images {clash[:3]} are already in the DB {source_db}; use new images")
    available = sum(len(s) for _, s in examples)
    if counts and counts[-1] > available:
        raise UserError(f"vocab-add: the pool {pool_json} has {available} usable {x_name!r} segments, "
                        f"counts ask for {counts[-1]}")
    return examples


def _vocab_add_point(ctx: Context, r: Rescorer, index: str, vocab, xi: int, n: int, info: dict) -> dict:
    """PQ on the added class, on the others and overall with the index's current version, after ``n`` examples."""
    ens, merge = ctx.cfg.label.ensemble, ctx.cfg.label.merge
    nb = ctx.neighbours(r, index)
    res = r.evaluate(ens, Retrieval(nb), merge)
    per = {p["name"]: p["pq"] for p in res["per_class"] if p["present"]}
    x_pq = next((p["pq"] for p in res["per_class"] if vocab.index_of(p["name"]) == xi and p["present"]), None)
    others = [v for k, v in per.items() if vocab.index_of(k) != xi]
    x_in_db = sum(1 for lab in nb.labels_vocab if vocab.index_of(lab) == xi)
    return {"n": n, "pq_x": x_pq, "pq_others_mean": float(np.mean(others)) if others else None, **_pqrow(res),
            "per_class": per, "index": f"{index}@{nb.version}", "index_count": nb.count,
            "x_label_in_index": bool(x_in_db), **info}


def _take_examples(examples: Iterator[tuple[dict, list[dict]]], n: int, total: int, doc: dict,
                   chosen_images: list[dict], chosen_anns: list[dict]) -> tuple[int, int]:
    """Append pool images (and their class segments) to ``chosen_images`` / ``chosen_anns`` until ``n``
    segments are chosen: (segments chosen, images added)."""
    new = 0
    while total < n:
        im, segs = next(examples)
        take = segs[: n - total]
        chosen_images.append(im)
        chosen_anns.append({"image_id": im["id"], "file_name": _ann_file(doc, im["id"]), "segments_info": take})
        total += len(take)
        new += 1
    return total, new


def _build_and_refresh(ctx: Context, pool, step_json: str, db: str, index: str) -> dict:
    """``build-db`` (ground-truth masks) of the pool images in ``step_json`` into ``db``, then ``refresh``
    of its index: the timings and the refresh's mode."""
    from ragseg.experiments.derive import index_cfg
    from ragseg.index.build import refresh_index
    from ragseg.pipelines.build_db import run_build_db

    src = pool.model_copy(update={"annotations": step_json})
    t1 = time.perf_counter()
    run_build_db(JobConfig.model_validate(deep_merge(ctx.cfg.model_dump(mode="json"), {
        "source": src.model_dump(mode="json"), "build_db": {"out": db, "masks": "gt"}})))
    t2 = time.perf_counter()
    ref = refresh_index(db, index_cfg(ctx.cfg, index))
    t3 = time.perf_counter()
    return {"build_db_seconds": t2 - t1, "refresh_seconds": t3 - t2, "seconds_to_published_index": t3 - t1,
            "mode": ref.get("mode"), "retrain_reason": ref.get("retrain_reason")}


def _vocab_add_plot(rep: Report, steps: list[dict], others: list[str], x_name: str) -> None:
    """PQ on the added class and the others against N, and the wall time of each step."""
    plt = _plt()
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    ns = [s["n"] for s in steps]
    xs = np.arange(len(ns))
    for nm in others:
        axs[0].plot(xs, [s["per_class"].get(nm, np.nan) for s in steps], color="0.75", lw=0.8)
    axs[0].plot(xs, [s["pq_others_mean"] for s in steps], "o-", color="C0", label="other classes (mean; grey: each)")
    axs[0].plot(xs, [s["pq_x"] if s["pq_x"] is not None else np.nan for s in steps], "o-", color="C3", lw=2,
                label=f"added class {x_name!r}")
    axs[0].set_xticks(xs, [str(n) for n in ns])
    axs[0].set_xlabel(f"examples of {x_name!r} added")
    axs[0].set_ylabel("PQ")
    axs[0].legend(fontsize=7)
    axs[0].set_title("PQ as examples are added")
    bd = [s["build_db_seconds"] or 0 for s in steps[1:]]
    rf = [s["refresh_seconds"] or 0 for s in steps[1:]]
    axs[1].bar(xs[1:], bd, label="build-db")
    axs[1].bar(xs[1:], rf, bottom=bd, label="refresh")
    axs[1].set_xticks(xs[1:], [str(n) for n in ns[1:]])
    axs[1].set_xlabel("N (cumulative examples)")
    axs[1].set_ylabel("seconds")
    axs[1].set_title("new images -> published index")
    axs[1].legend(fontsize=7)
    rep.figure(fig, "vocab_add", f"PQ on {x_name!r} rising from 0 as examples are added; wall time per step")


def run_vocab_add(ctx: Context, out: str) -> dict:
    from ragseg.config import SourceConfig

    c = ctx.cfg.experiment.vocab_add
    d = pick_with_db(ctx.sets, c.dataset, "vocab-add")
    vocab = ctx.vocab(d)
    x_name, xi = _vocab_add_class(c.class_name, vocab, d.vocab)
    pool = c.pool or (SourceConfig.model_validate(ctx.extras["pool"]) if ctx.extras.get("pool") else None)
    if pool is None:
        raise UserError("vocab-add needs experiment.vocab_add.pool: new images with panoptic ground truth")
    pool_json, _ = gt_paths(pool)
    r = ctx.rescorer(d)
    work = io.join(out, "work")
    db, index, base, base_seconds = _base_without_class(ctx, d.db, work, vocab, xi)
    counts = sorted({n for n in c.counts if n > 0})
    examples = _checked_examples(ctx, db, d.db, pool_json, vocab, xi, x_name, c.seed, counts)
    doc = io.read_json(pool_json)

    steps = [_vocab_add_point(ctx, r, index, vocab, xi, 0, {
        "build_db_seconds": None, "refresh_seconds": None, "seconds_to_published_index": base_seconds,
        "new_images": 0, "mode": "base build (DB without the class)"})]
    chosen_images, chosen_anns, total = [], [], 0
    it = iter(examples)
    for n in track(counts, len(counts), f"vocab-add: {x_name} examples (build-db + refresh)", ctx.progress):
        total, new = _take_examples(it, n, total, doc, chosen_images, chosen_anns)
        step_json = io.join(work, f"pool_{n}.json")
        io.write_json_atomic(step_json, {"images": chosen_images, "annotations": chosen_anns,
                                         "categories": doc["categories"]})
        timing = _build_and_refresh(ctx, pool, step_json, db, index)
        steps.append(_vocab_add_point(ctx, r, index, vocab, xi, n, {
            "build_db_seconds": timing["build_db_seconds"], "refresh_seconds": timing["refresh_seconds"],
            "seconds_to_published_index": timing["seconds_to_published_index"], "new_images": new,
            "mode": timing["mode"], "retrain_reason": timing["retrain_reason"]}))
    rep = Report(out, "vocab-add", ctx.provenance({d.name: f"{d.db} without {x_name!r} ({base['rows']} segments), "
                                                           f"then + N via build-db + refresh into {index}"},
                                                  [c.seed], dataset=d.name, class_name=x_name))
    rep.note(f"Class {x_name!r}: its {base['source_rows'] - base['rows']} segments are removed from {d.db}; then N of "
             f"its examples from new pool images ({pool_json}, only their {x_name!r} segments labelled) go through "
             f"`build-db` (ground-truth masks) into that DB and `refresh` publishes a new index version. Time = "
             f"build-db + refresh, from the new images to a published index. Re-scored from the feature cache.")
    others = [nm for nm in vocab.names if vocab.index_of(nm) != xi]
    rep.table(f"PQ on {x_name!r} and on the other classes as N grows",
              ["N", f"PQ {x_name}", "PQ others (mean)", "PQ all", "new images", "build-db s", "refresh s",
               "to published index s", "refresh", "index"],
              [[s["n"], s["pq_x"], s["pq_others_mean"], s["pq"], s["new_images"], s["build_db_seconds"],
                s["refresh_seconds"], s["seconds_to_published_index"],
                s.get("retrain_reason") or ("incremental" if s["n"] else "-"), s["index"]] for s in steps])
    rep.table("PQ per class", ["N"] + list(vocab.names),
              [[s["n"]] + [s["per_class"].get(nm) for nm in vocab.names] for s in steps])
    _vocab_add_plot(rep, steps, others, x_name)
    return rep.write(TITLES["vocab-add"], {"dataset": d.name, "class": x_name, "steps": steps,
                                           "base_db_rows": base["rows"], "pool": pool_json})


def _ann_file(doc: dict, image_id) -> str:
    for a in doc["annotations"]:
        if a["image_id"] == image_id:
            return a["file_name"]
    raise UserError(f"pool image {image_id} has no annotation")


RUNNERS = {"domain-shift": run_domain_shift, "db-size": run_db_size, "coverage": run_coverage,
           "sweep": run_sweep, "vocab-add": run_vocab_add}


def run(cfg: JobConfig, name: str, out: str, config_path: str) -> dict:
    """Run one experiment (or ``all``: each into ``out/<name>/``, with ``out/index.html``)."""
    from ragseg.experiments import EXPERIMENTS
    from ragseg.experiments.report import index_page

    names = list(EXPERIMENTS) if name == "all" else [name]
    bad = [n for n in names if n not in RUNNERS]
    if bad:
        raise UserError(f"unknown experiment {bad[0]!r}; known: {', '.join(EXPERIMENTS)} or all")
    ctx = Context.make(cfg, config_path)
    results = {}
    for n in names:
        t0 = time.perf_counter()
        target = io.join(out, n) if name == "all" else out
        res = RUNNERS[n](ctx, target)
        res["seconds"] = time.perf_counter() - t0
        io.write_json_atomic(io.join(target, "results.json"), res)
        results[n] = res
    if name == "all":
        index_page(out, [(n, TITLES[n]) for n in names])
    return results
