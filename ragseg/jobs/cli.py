"""The ``ragseg`` command line (typer). Each command parses a config and calls one pipeline or
library function; no logic lives here. User errors print one line and exit with code 2."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer

from ragseg.config import JobConfig, load_config
from ragseg.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Retrieval-augmented open-vocabulary panoptic segmentation.")

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config (any fsspec URI).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b=c (repeatable).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")]
RetryOpt = Annotated[bool, typer.Option(
    "--retry-errors", help="Re-process only the images whose latest outcome in the output is an error row.")]
MatchingOpt = Annotated[str | None, typer.Option(
    "--errors-matching", metavar="REGEX",
    help="With --retry-errors: only errors whose '<stage>: <Type>: <message>' matches REGEX (searched, RE2).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also show Ray's, faiss's and the models' own "
                                          "output (always in OUT/_logs/).")]


def _cfg(config: str | None, sets: list[str] | None, options: dict[str, object] | None = None) -> JobConfig:
    """The config file, then the command's own options (those given), then ``--set`` overrides
    (errors name the option or ``--set`` that caused them)."""
    given = [(key, val) for key, val in (options or {}).items() if val is not None]
    extra = [f"{key}={val}" for key, val in given]
    origins = [f"--{key.split('.')[1 if key.startswith('label.images.') else -1].replace('_', '-')} {val}"
               for key, val in given] + [f"--set {s}" for s in sets or []]
    return load_config(config, extra + list(sets or []), origins)


def _print_json(obj) -> None:
    from ragseg.console import out_stream

    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str), file=out_stream())


def _job(job: str, out: str | None, fn, verbose: bool, **kw):
    from ragseg.jobs.runner import run_job

    return run_job(job, out, fn, verbose=verbose, **kw)


def _index_versions(uri: str) -> int | None:
    from ragseg.index.versions import list_versions

    try:
        return len(list_versions(uri))
    except Exception:  # noqa: BLE001 - unknown: leave the folder alone
        return None


@app.command("make-synthetic")
def make_synthetic_cmd(
    out: Annotated[str, typer.Option(help="Output directory (fsspec URI).")],
    images: Annotated[int, typer.Option(help="Number of images (train + val).")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    val_fraction: Annotated[float, typer.Option(help="Fraction of images in the val split.")] = 0.25,
) -> None:
    """Draw a synthetic panoptic set and write it as COCO panoptic, ADE20k panoptic and Open Images."""
    from ragseg.sources.synthetic import make_synthetic

    _print_json(make_synthetic(out, images=images, seed=seed, size=size, val_fraction=val_fraction))


@app.command("eval")
def eval_cmd(
    gt_json: Annotated[str, typer.Option(help="Ground-truth COCO panoptic JSON.")],
    gt_dir: Annotated[str, typer.Option(help="Ground-truth PNG folder.")],
    pred_json: Annotated[str, typer.Option(
        help="Predicted COCO panoptic JSON, or the --out folder of `ragseg label` (its parts are read directly).")],
    pred_dir: Annotated[str | None, typer.Option(
        help="Predicted PNG folder (default with a label folder: its panoptic/).")] = None,
    out: Annotated[str | None, typer.Option(help="Write the metrics JSON here.")] = None,
    allow_missing: Annotated[bool, typer.Option(
        help="Score ground-truth images the prediction lacks as empty predictions instead of failing.")] = False,
    match_categories_by_name: Annotated[bool, typer.Option(
        help="Map the prediction's category ids onto the ground truth's by class name (for a prediction that "
             "numbers its categories its own way). Default: ids are used as they are, as COCO's panopticapi does.")
    ] = False,
) -> None:
    """PQ / SQ / RQ for All, Things, Stuff and per class (COCO panoptic semantics)."""
    from ragseg.eval.pq import evaluate, format_table

    res = evaluate(gt_json, gt_dir, pred_json, pred_dir, allow_missing=allow_missing,
                   match_categories_by_name=match_categories_by_name)
    for line in res.get("warnings", []):
        typer.echo(f"warning: {line}", err=True)
    typer.echo(format_table(res))
    if out:
        from ragseg.io import write_json_atomic

        write_json_atomic(out, res)
        typer.echo(f"metrics written to {out}")


@app.command("build-db")
def build_db_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option(help="DB URI (overrides build_db.out).")] = None,
    address: AddressOpt = None,
    retry_errors: RetryOpt = False,
    errors_matching: MatchingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Source -> (gt masks | detect -> segment) -> embed -> Parquet feature shards + manifest.
    Ctrl-C stops it (rerun the same command to resume); Ray's own output goes to OUT/_logs/."""
    from ragseg.pipelines.build_db import run_build_db

    cfg = _cfg(config, set_, {"build_db.out": out, "ray.address": address})
    _print_json(_job("build-db", cfg.build_db.out,
                     lambda: run_build_db(cfg, retry_errors=retry_errors, errors_matching=errors_matching), verbose))


@app.command("build-index")
def build_index_cmd(
    db: Annotated[str, typer.Option(help="Feature DB URI (output of build-db).")],
    out: Annotated[str, typer.Option(help="Index store URI.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    budget_bytes_per_vector: Annotated[int | None, typer.Option(help="Memory budget per vector.")] = None,
    factory: Annotated[str | None, typer.Option(help="Explicit faiss factory string.")] = None,
    nprobe: Annotated[int | None, typer.Option(help="Default nprobe stored with the index.")] = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train IVF-PQ on a sample, add shards in parallel, merge on disk, publish a new version."""
    from ragseg.index.build import build_index

    options = {"index.out": out, "index.budget_bytes_per_vector": budget_bytes_per_vector,
               "index.factory": factory, "index.nprobe": nprobe, "ray.address": address}
    cfg = _cfg(config, set_, options)
    _print_json(_job("build-index", out, lambda: build_index(db, cfg), verbose, committed=_index_versions))


@app.command("refresh")
def refresh_cmd(
    db: Annotated[str, typer.Option(help="Feature DB URI.")],
    index: Annotated[str, typer.Option(help="Index store URI.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force_retrain: Annotated[bool, typer.Option(help="Retrain the quantizer.")] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Add the DB's new shards to a new index version (retrain on drift or when forced)."""
    from ragseg.index.build import refresh_index

    cfg = _cfg(config, set_, {"index.out": index, "ray.address": address})
    _print_json(_job("refresh", index, lambda: refresh_index(db, cfg, force_retrain=force_retrain), verbose,
                     committed=_index_versions))


@app.command("search")
def search_cmd(
    index: Annotated[str, typer.Option(help="Index store URI.")],
    image: Annotated[str, typer.Option(help="Query image URI.")],
    box: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 region.")] = None,
    mask: Annotated[str | None, typer.Option(help="Mask PNG (non-zero = inside).")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours.")] = 10,
    nprobe: Annotated[int | None, typer.Option(help="Lists probed.")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help=(
        "YAML config (optional: the embedder comes from the index; a config's models.clip fields must "
        "agree with it; device, weights cache/mirror and index.use_gpu are taken from here)."))] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed a region of an image with the index's own embedder and print its nearest labelled database
    segments. No config needed: the index records the CLIP model, weights and pooling that made it."""
    from ragseg.index.search import search_region

    cfg = _cfg(config, set_)
    _print_json(_job("search", None, lambda: search_region(index, image, box=box, mask=mask, k=k, nprobe=nprobe,
                                                           cfg=cfg), verbose))


@app.command("info")
def info_cmd(index: Annotated[str, typer.Argument(help="Index store, feature DB, label output or a Parquet file ragseg wrote.")]
             ) -> None:
    """An index store: the live version's counts, parameters, nprobe / re-rank settings, bytes per vector,
    the quality measured at build, its embedder and provenance. A feature DB or a label output: what is
    committed (pieces, images, mask segments, errors; each image once, with its latest outcome), its
    errors counted by stage and reason, the ledger's files, the embedder and provenance (ragseg version,
    config YAML, models and checksums, index, vocabulary, proposals, ensemble). A Parquet file: its rows,
    columns and provenance."""
    from ragseg.index.store import index_info
    from ragseg.io import exists, join

    if index.lower().endswith(".parquet"):
        _print_json(_parquet_info(index))
        return
    if exists(join(index, "manifest.json")):
        from ragseg import ledger

        head = ledger.read_header(index, ledger.peek_kind(index))
        led = ledger.load(index, head["kind"])
        _print_json({"uri": index, "kind": head["kind"], "format": head["format"],
                     # what readers see: committed pieces and their images, mask segments and error rows
                     "committed": led.totals(),
                     "errors_by_stage": ledger.error_counts(led),
                     # the commit ledger's own files (manifest segments of commit records, not masks)
                     "ledger": {"manifest_segment_files": len(head["segments"]),
                                "uncompacted_commit_records": len(led.uncompacted)},
                     "runs": ledger.run_count(head),
                     **{k: head[k] for k in ("embed_model", "embed_mode", "dim", "embedder", "config_hash",
                                             "index_version", "provenance") if k in head}})
        return
    if not exists(index):
        raise UserError(f"not found: {index} (info takes an index store, a feature DB, a label output or a "
                        ".parquet file)")
    from ragseg.console import LOGS
    from ragseg.failures import _entries
    from ragseg.index.versions import current_version

    if current_version(index) is None and not _entries(index, "v0"):
        logs = join(index, LOGS) if LOGS in _entries(index) else None
        _print_json({"uri": index, "status": "not started: no job has committed or published anything here "
                     "(a rerun starts it afresh)", "logs": logs})
        return
    _print_json(index_info(index))


def _parquet_info(uri: str) -> dict:
    import pyarrow.parquet as pq

    from ragseg import provenance
    from ragseg.io import exists, fs_and_path

    if not exists(uri):
        raise UserError(f"not found: {uri}")
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    return {"uri": uri, "rows": meta.num_rows, "columns": {f.name: str(f.type) for f in schema},
            "provenance": provenance.read_parquet(uri)}


@app.command("migrate")
def migrate_cmd(folder: Annotated[str, typer.Argument(help="Feature DB or label output written by ragseg < 0.2.")]
                ) -> None:
    """Upgrade a feature DB or label output folder from manifest format 1 (one JSON listing every shard)
    to format 2 (commit records + compacted segments), in place. Run it with no job writing there."""
    from ragseg import labels_out
    from ragseg.db import KIND, migrate_v1
    from ragseg.io import read_json

    try:
        old = read_json(folder.rstrip("/") + "/manifest.json")
    except FileNotFoundError:
        raise UserError(f"{folder}/manifest.json not found: not a ragseg output folder") from None
    kind = KIND if "embed_model" in old else labels_out.KIND
    _print_json(migrate_v1(folder, kind))


@app.command("label")
def label_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    images: Annotated[str | None, typer.Option(help="Image folder/glob URI (folder source).")] = None,
    vocab: Annotated[str | None, typer.Option(help=(
        'Vocabulary: inline names "ball,crate,sky:stuff"; a .txt file with one name per line; a JSON list '
        '["ball", "sky:stuff"] or of {"name": "sky", "isthing": false}; a CSV name[,isthing[,id[,synonyms]]]; '
        "or a COCO panoptic categories JSON. name:thing / name:stuff sets the flag (default: the packaged "
        "ADE20k / COCO flag of that name, else thing); name|synonym|... adds synonyms."))] = None,
    index: Annotated[str | None, typer.Option(help="Index store URI.")] = None,
    fallback_index: Annotated[str | None, typer.Option(help="Secondary (generic) index.")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI.")] = None,
    proposals: Annotated[str | None, typer.Option(help="fcclip | gdino-sam | sam-grid | gt")] = None,
    address: AddressOpt = None,
    retry_errors: RetryOpt = False,
    errors_matching: MatchingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Panoptic pseudo-labels for a corpus: proposals -> masked CLIP -> retrieval + CLIP -> merge. The
    CLIP embedder's identity fields the config leaves out come from the index; ones it sets must agree.
    Ctrl-C stops it (rerun the same command to resume); Ray's own output goes to OUT/_logs/."""
    from ragseg.pipelines.label import run_label

    options: dict[str, object] = {"label.vocab": vocab, "label.index": index, "label.fallback_index": fallback_index,
                                  "label.out": out, "label.proposals": proposals, "ray.address": address}
    if images:
        options.update({"label.images.kind": "folder", "label.images.uri": images})
    cfg = _cfg(config, set_, options)
    _print_json(_job("label", cfg.label.out,
                     lambda: run_label(cfg, retry_errors=retry_errors, errors_matching=errors_matching), verbose))


@app.command("convert-weights")
def convert_weights_cmd(
    src: Annotated[str, typer.Argument(help="Checkpoint .pth (path, http(s) URL or bucket URI).")],
    out: Annotated[str, typer.Argument(help="Output .safetensors file (path or bucket URI).")],
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of SRC.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Convert a (detectron2) FC-CLIP checkpoint to safetensors, loading it once under an allow-list."""
    from ragseg.models.fcclip import convert_checkpoint

    if not out.endswith(".safetensors"):
        raise UserError(f"convert-weights: OUT must end with .safetensors, got {out}")
    _print_json(convert_checkpoint(src, out, sha256, _cfg(config, set_).models))


@app.command("visualize")
def visualize_cmd(
    images: Annotated[str, typer.Option(help="Image folder URI the labels were made from.")],
    pred: Annotated[str, typer.Option(help="Output URI of `ragseg label`.")],
    out: Annotated[str, typer.Option(help="Folder for overlay PNGs and index.html.")],
    limit: Annotated[int, typer.Option(help="At most this many images.")] = 100,
) -> None:
    """Overlay PNGs with class names and an index.html contact sheet."""
    from ragseg.pipelines.visualize import visualize

    _print_json(visualize(images, pred, out, limit=limit))


@app.command("demo")
def demo_cmd(config: ConfigOpt = "configs/demo.yaml", set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Whole pipeline on a generated set with tiny models: synthetic -> DB -> index -> label -> PQ."""
    from ragseg.pipelines.demo import run_demo

    cfg = _cfg(config, set_)
    _job("demo", cfg.demo.workdir, lambda: run_demo(cfg), verbose, committed=lambda _: None)


from ragseg.jobs.experiment import register as _register_experiment  # noqa: E402

_register_experiment(app)


# ----------------------------------------------------------------------------------------------
# weights sync / weights check, env
# ----------------------------------------------------------------------------------------------
weights_app = typer.Typer(no_args_is_help=True, help="Model checkpoints: copy them into a mirror, check where they load from.")
app.add_typer(weights_app, name="weights")
OnlyOpt = Annotated[str | None, typer.Option(help="Only these model sections (comma list of clip, sam, gdino).")]


def _sections(only: str | None) -> set[str] | None:
    if not only:
        return None
    got = {p.strip() for p in only.split(",") if p.strip()}
    bad = sorted(got - {"clip", "sam", "gdino"})
    if bad:
        raise UserError(f"--only: unknown model sections {bad} (clip, sam, gdino)")
    return got


@weights_app.command("sync")
def weights_sync_cmd(
    to: Annotated[str, typer.Option(help="Mirror URI: a bucket (s3://, gs://) or a folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    write_config: Annotated[str | None, typer.Option(help="Also write the config with the mirror overrides here.")] = None,
) -> None:
    """Resolve every checkpoint the config names (open_clip tags, hub ids, URLs, paths) and copy each,
    with its sha256, into the mirror; print the overrides that make jobs load from it."""
    from ragseg.models import weights

    cfg = _cfg(config, set_)
    records = weights.sync(cfg.models, to, _sections(only))
    overrides = weights.sync_overrides(cfg.models, records, to)
    result: dict[str, object] = {"mirror": to, "checkpoints": records, "overrides": overrides,
                                 "usage": " ".join(f"--set {o}" for o in overrides)}
    if write_config:
        import yaml

        from ragseg.config import apply_overrides, read_yaml_config
        from ragseg.io import write_text_atomic

        data = apply_overrides(read_yaml_config(config) if config else {}, list(set_ or []) + overrides)
        JobConfig.model_validate(data)  # the same keys as cfg plus the mirror and sha256 fields
        write_text_atomic(write_config, yaml.safe_dump(data, sort_keys=False))
        result["config"] = write_config
    _print_json(result)


@weights_app.command("check")
def weights_check_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    only: OnlyOpt = None,
    verify: Annotated[bool, typer.Option(help="Hash local copies against the known sha256.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per checkpoint: where it would load from (local, cache, mirror, origin), cached or not, size,
    sha256 verified or not. Exit code 2 when one cannot be loaded."""
    from ragseg.models import weights

    cfg = _cfg(config, set_)
    rows = [weights.locate(ck, cfg.models.weights, verify=verify).row()
            for ck in weights.checkpoints(cfg.models, _sections(only))]
    if as_json:
        _print_json(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("field", "ref", "loads from", "cached", "size", "sha256")
        for r in rows:
            size = "-" if r["size"] is None else f"{r['size'] / 2**20:.1f} MiB"
            sha = {True: "verified", False: "MISMATCH", None: "unknown" if not r["sha256"] else "not checked"}
            table.add_row(r["field"], r["ref"], r["source"], "yes" if r["cached"] else "no", size,
                          sha[r["verified"]])
        Console(width=200).print(table)
        if not rows:
            typer.echo("the config names no checkpoint (random-weight models)")
    bad = [r["problem"] for r in rows if r["problem"]]
    if bad:
        raise UserError(f"{len(bad)} checkpoint(s) cannot be loaded: " + " | ".join(bad))


@app.command("env")
def env_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """What a bug report needs: package versions, torch and CUDA, GPUs, Ray cluster, cache dir, FAISS build."""
    from ragseg.envinfo import collect, format_text

    info = collect(_cfg(config, set_, {"ray.address": address}))
    if as_json:
        _print_json(info)
    else:
        typer.echo(format_text(info))


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _exit_user_error(e: UserError, ray_was_running: bool) -> None:
    from ragseg.console import say
    from ragseg.jobs.runner import shutdown_own_ray

    # the job's own Ray: its workers' log lines stop here, so the error stays the last line (a Ray
    # that the caller started, e.g. main() called in a test session, is the caller's)
    shutdown_own_ray(ray_was_running)
    say(f"error: {' '.join(str(e).split())}")
    sys.exit(2)


def _exit_internal(e: BaseException, ray_was_running: bool) -> None:
    """An unexpected error outside a job (whose runner already logged it): the trace to a log file,
    one line naming it, exit code 1."""
    import tempfile
    import time
    import traceback

    from ragseg.console import say
    from ragseg.jobs.runner import shutdown_own_ray

    shutdown_own_ray(ray_was_running)
    where = "(no log written)"
    try:
        fd, where = tempfile.mkstemp(prefix=f"ragseg-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".log")
        with open(fd, "w") as f:
            f.write(" ".join(sys.argv) + "\n" + "".join(traceback.format_exception(e)))
    except OSError:
        pass
    say(f"error: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (full trace in {where})")
    sys.exit(1)


def main() -> None:
    from ragseg.failures import InternalError, classify
    from ragseg.interrupt import EXIT_CODE, JobInterrupted, resume_line

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ray_was_running = _ray_running()
    try:
        app(standalone_mode=False)
    except JobInterrupted as e:
        from ragseg.console import say

        say(str(e) if str(e).startswith("interrupted:") else resume_line(e.pieces))
        sys.exit(EXIT_CODE)
    except InternalError as e:  # a job's unexpected error: its trace is in the job's log already
        from ragseg.console import say

        say(f"error: {e}")
        sys.exit(1)
    except UserError as e:  # a Ray error that is also a UserError carries a traceback: its cause's line
        from ragseg.errors import user_error_from_ray

        _exit_user_error(user_error_from_ray(e) or e, ray_was_running)
    except FileNotFoundError as e:
        from ragseg.console import say

        say(f"error: file not found: {e.filename or e}")
        sys.exit(2)
    except typer.Abort:
        sys.exit(EXIT_CODE)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", None) if isinstance(e, typer.Exit) else e.code
        sys.exit(code or 0)
    except typer.TyperException as e:  # usage errors: unknown option, missing argument, bad value
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except Exception as e:  # a UserError raised in a Ray worker, a full disk...: one line, exit code 2
        from ragseg.errors import user_error_from_ray

        found = user_error_from_ray(e) or classify(e, None)
        if found is None:
            _exit_internal(e, ray_was_running)
        _exit_user_error(found, ray_was_running)


if __name__ == "__main__":
    main()
