"""``ragseg experiment NAME``: the paper's experiments, one command each (ragseg.experiments).
Registered on the main app by :func:`register` (ragseg/jobs/cli.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from ragseg.experiments import EXPERIMENTS


def experiment_cmd(
    name: Annotated[str, typer.Argument(help=f"{' | '.join(EXPERIMENTS)} | all")],
    config: Annotated[str, typer.Option("--config", "-c", help="YAML config with an `experiment:` section.")]
    = "configs/experiments.yaml",
    out: Annotated[str, typer.Option(help="Output folder: results.json, results.md, PNG plots, index.html.")]
    = "./experiments_out",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b=c (repeatable).")] = None,
    cache: Annotated[str | None, typer.Option(help="Feature cache folder (experiment.cache).")] = None,
) -> None:
    """domain-shift, db-size, coverage, sweep, vocab-add (or all): re-scored from a feature cache that
    runs the models once per evaluation set; see README "Experiments"."""
    import json

    from ragseg.config import load_config
    from ragseg.experiments.runs import run

    sets = ([f"experiment.cache={cache}"] if cache else []) + list(set_ or [])
    res = run(load_config(config, sets), name, out, config)
    summary = {n: {"out": out if name != "all" else f"{out.rstrip('/')}/{n}", "seconds": round(r["seconds"], 1),
                   "plots": r["files"]["plots"]} for n, r in res.items()}
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment_cmd)
